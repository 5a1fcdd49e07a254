"""What every mixer receives beside its hidden states: positions, document boundaries, decoding offset, and a
place to report auxiliary losses and metrics (the DSA indexer's KL, attention recall).

Under activation checkpointing a block's forward runs twice; the backward's recomputation gets
`seq.for_recompute()`, whose reports go nowhere and whose `recomputing` flag tells layers to skip other side effects
(MoE's load counts).

Shapes: `position_ids [B, T]`; `cu_seqlens [N + 1]` (batch 1, N packed documents).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .rope import rope_cos_sin


@dataclass
class SequenceInfo:
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    offset: int = 0
    aux_losses: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    collect_metrics: bool = True  # False skips diagnostics that cost real time (DSA's dense attention recall)
    recomputing: bool = False  # True in activation checkpointing's recomputation: record no side effects
    checkpointed: bool = False  # True while a checkpointed block runs: its forward runs again in the backward
    _rope: dict = field(default_factory=dict)

    def for_recompute(self) -> "SequenceInfo":
        """The same positions and boundaries (and rotary cache) with fresh places to report to, which nobody reads,
        no costly diagnostics, and `recomputing` and `checkpointed` set."""
        return dataclasses.replace(self, aux_losses=[], metrics={}, collect_metrics=False, recomputing=True,
                                   checkpointed=True)

    def for_checkpointed(self) -> "SequenceInfo":
        """The same, reporting to the same places (the first, real forward of a checkpointed block), with
        `checkpointed` set so ops can skip work that pays off only when the forward runs once."""
        return dataclasses.replace(self, checkpointed=True)

    def rope(self, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[B, T, dim]`, computed once per forward for each (dim, theta)."""
        key = (dim, theta)
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.position_ids, dim, theta)
        return self._rope[key]


class GrowingBuffer:
    """A decoding cache tensor `[B, L, ...]` that grows along dim 1 with amortised O(1) appends."""

    def __init__(self):
        self.data: torch.Tensor | None = None
        self.length = 0

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Append `new [B, t, ...]`; return a view of everything so far `[B, L + t, ...]`."""
        need = self.length + new.shape[1]
        if torch.is_grad_enabled() and (new.requires_grad or (self.data is not None and self.data.requires_grad)):
            # recording gradients: an in-place write would change keys an earlier step's graph saved; concatenate
            self.data = new if self.data is None else torch.cat([self.data[:, : self.length], new], dim=1)
            self.length = need
            return self.data
        if self.data is None or need > self.data.shape[1]:
            cap = max(need, 2 * (self.data.shape[1] if self.data is not None else 0), 64)
            grown = new.new_empty((new.shape[0], cap, *new.shape[2:]))
            if self.data is not None:
                grown[:, : self.length] = self.data[:, : self.length]
            self.data = grown
        self.data[:, self.length: need] = new
        self.length = need
        return self.data[:, :need]
