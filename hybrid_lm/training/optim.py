"""AdamW with decoupled weight decay groups and the learning-rate schedules of the trainer.

Schedules (step s counts optimizer updates from 0):
- warm-up: linear from lr/warmup_steps to lr over `warmup_steps` updates (no warm-up when 0);
- cosine: half a cosine from lr down to min_lr at `total_steps` (Loshchilov & Hutter, SGDR);
- wsd: warmup-stable-decay (Hu et al., MiniCPM 2024): lr held flat, then a linear decay to min_lr over the last
  `decay_fraction` of the steps, so a run can be extended from a stable-phase checkpoint;
- constant: lr after warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

__all__ = ["LRSchedule", "param_groups", "build_optimizer", "build_scheduler", "NO_DECAY_KEYWORDS"]

NO_DECAY_KEYWORDS = ("embed", "norm", "bias")


def _decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay only on matrices: decaying gains, biases or embedding rows only pulls them toward zero."""
    lowered = name.lower()
    return param.ndim >= 2 and not any(k in lowered for k in NO_DECAY_KEYWORDS)


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group (empty groups dropped)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if _decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], optim_cfg, device: torch.device
                    ) -> torch.optim.AdamW:
    groups = param_groups(named_params, optim_cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: check dsa_stage (dense_warmup needs a model with DSA layers)")
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             fused=fused or None)


@dataclass
class LRSchedule:
    """Multiplier of the base lr at update `step`; a picklable object so LambdaLR can save its state."""

    schedule: str
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    decay_fraction: float = 0.2

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        floor = self.min_lr / self.lr if self.lr > 0 else 0.0
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "wsd":
            decay_steps = max(1, round(self.decay_fraction * self.total_steps))
            decay_start = max(self.warmup_steps, self.total_steps - decay_steps)
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start + 1) / max(1, self.total_steps - decay_start))
            return 1.0 - (1.0 - floor) * progress
        raise AssertionError(f"unchecked schedule {self.schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    fn = LRSchedule(optim_cfg.schedule, optim_cfg.lr, optim_cfg.min_lr, optim_cfg.warmup_steps, total_steps,
                    optim_cfg.decay_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
