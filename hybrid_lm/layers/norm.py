"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019) and the gated RMSNorm of Gated DeltaNet / Qwen3-Next.

Both normalise in fp32 and return the input dtype, or `dtype` where given (the blocks pass `matmul_dtype(x)`: under
autocast the normalised activations are cast once to the autocast dtype here, not once by each projection that
reads them). Shapes: `[..., D]`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.norm import rms_norm


def matmul_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product of `tensors` runs in, as `nn.Linear` would: autocast's on their device type where
    it is on and none of them is fp64 (autocast leaves fp64 alone), else their promoted dtype."""
    kind = tensors[0].device.type
    dtypes = [t.dtype for t in tensors]
    if torch.is_autocast_enabled(kind) and torch.float64 not in dtypes:
        return torch.get_autocast_dtype(kind)
    return functools.reduce(torch.promote_types, dtypes)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32, returned in `dtype` (ops.rms_norm: torch's F.rms_norm, or the
        # Triton kernel that writes `dtype` directly)
        return rms_norm(x, self.weight, self.eps, dtype or x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class GatedRMSNorm(RMSNorm):
    """`RMSNorm(x) * weight * silu(gate)`: the output norm of Gated DeltaNet (fla's FusedRMSNormGated)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = super().forward(x).float() * F.silu(gate.float())
        return y.to(x.dtype)
