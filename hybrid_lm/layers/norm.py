"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019) and the gated RMSNorm of Gated DeltaNet / Qwen3-Next.

Both normalise in fp32 and return the input dtype. Shapes: `[..., D]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32 (bit-identical to the formula on CPU); on CUDA F.rms_norm can
        # take torch's fused kernel where the formula is ~6 elementwise kernels forward and more backward
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class GatedRMSNorm(RMSNorm):
    """`RMSNorm(x) * weight * silu(gate)`: the output norm of Gated DeltaNet (fla's FusedRMSNormGated)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = super().forward(x).float() * F.silu(gate.float())
        return y.to(x.dtype)
