"""Rotary position embeddings (Su et al. 2021, RoFormer) in Llama's rotate-half (non-interleaved) layout.

Shapes: `x [B, T, H, D]`, positions `[B, T]`; cos/sin `[B, T, R]` with R <= D the rotated dims, which are the
first R dims of each head (DeepSeek's indexer rotates the first half of its dims, Qwen3-Next a quarter).
"""

from __future__ import annotations

import torch

from .. import ops


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables `[B, T, dim]` for integer positions `[B, T]`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, dim]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of every head of `x [B, T, H, D]` in fp32; the rest pass through
    (`ops.rotary`: its PyTorch reference, or one Triton kernel each way)."""
    return ops.rotary(x, cos, sin)
