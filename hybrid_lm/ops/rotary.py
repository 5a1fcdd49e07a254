"""Rotary position embeddings applied to a head tensor (RoFormer; Llama's rotate-half layout).

``rotary(x, cos, sin)`` rotates the first ``R = cos.shape[-1]`` dims of every head of ``x [B, T, H, D]`` by the
per-token angles whose cos / sin tables are ``[B, T, R]`` (fp32, halves ``(i, i + R/2)`` form the pairs); dims
``R..D`` pass through. The math is fp32 whatever x's dtype, the output has x's dtype:

    y[:R/2] = x1 * cos1 - x2 * sin1,   y[R/2:R] = x2 * cos2 + x1 * sin2

Backends: ``reference`` (PyTorch, six elementwise passes forward) and ``triton`` (one kernel each way;
ops/triton/rotary.py).
"""

from __future__ import annotations

import torch

from .backends import get_backend, register_backend, resolve_backend

__all__ = ["rotary"]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape or cos.shape[:2] != x.shape[:2]:
        raise ValueError(f"rotary: need x [B, T, H, D] and cos / sin [B, T, R]; got x {tuple(x.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    R = cos.shape[-1]
    if R % 2 or not 0 < R <= x.shape[-1]:
        raise ValueError(f"rotary: the rotated dims R = {R} must be even and in (0, head dim = {x.shape[-1]}]")
    name = resolve_backend("rotary", backend, x.device, x.dtype, features={"device": x.device})
    return get_backend("rotary", name)(x, cos, sin)


def _rotary_reference(x, cos, sin):
    """x * cos + rotate_half(x) * sin with the half-swap's sign on the small [B, T, 1, R] sin table and one fp32
    copy of x (bit-identical to the textbook formula)."""
    r = cos.shape[-1]
    s1, s2 = sin.chunk(2, dim=-1)
    cos, sin_signed = cos[:, :, None, :], torch.cat([-s1, s2], dim=-1)[:, :, None, :]  # [B, T, 1, R]
    x_rot, x_pass = x[..., :r], x[..., r:]
    xf = x_rot.float()
    x1, x2 = xf.chunk(2, dim=-1)
    y = (xf * cos + torch.cat([x2, x1], dim=-1) * sin_signed).to(x.dtype)
    return torch.cat([y, x_pass], dim=-1) if x_pass.shape[-1] else y


register_backend("rotary", "reference", _rotary_reference)
