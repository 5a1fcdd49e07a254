"""SwiGLU feed-forward (Shazeer 2020): `down_proj(silu(gate_proj(x)) * up_proj(x))`. Shapes: `[B, T, C]`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, seq=None) -> torch.Tensor:  # `seq`: the block's, used by MoE only
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
