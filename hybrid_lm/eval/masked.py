"""Packed training batches whose labels skip the unpredictable tokens of recall documents.

A recall document is mostly random keys, values and digits that no model can predict; trained on with the plain
LM loss, their gradient noise drowns the few answer tokens and a small model never learns to recall within a CPU
budget (measured: no progress in 400 steps). Zoology (arXiv 2312.04927) trains MQAR on the answers only; so does
this. The mask is a second stream aligned with the token stream (1 = train on this token); a shadow
`PackedBatches` over it, with the same seed and position, yields exactly the rows of the real one.

A row starts at a random offset, so its first segment is usually the tail of a document cut by the row boundary.
For text that only shortens the context; for a recall document it may remove the keys its answers need, and
training on those answers teaches guessing (about one document in `seq_len / length` is cut). So a row's first
segment trains on nothing when it is part of a recall document: one with a masked token (a text document is
all 1s, its eos included; a recall document's eos is 0).
"""

from __future__ import annotations

import numpy as np

from ..data import PackedBatches


class MaskedBatches:
    """Wraps a `PackedBatches`; a label is -100 where the mask is 0. Saves and resumes as the wrapped one."""

    def __init__(self, inner: PackedBatches, mask: np.ndarray):
        if len(mask) != len(inner.tokens):
            raise ValueError(f"the loss mask has {len(mask)} entries but the training split has {len(inner.tokens)} "
                             "tokens; rebuild the recall mix")
        self.inner = inner
        self.shadow = PackedBatches(mask, inner.seq_len, inner.batch_size, eos_id=255, seed=inner.seed,
                                    rank=inner.rank, world_size=inner.world_size, shuffle=inner.shuffle)
        self.shadow.load_state_dict(inner.state_dict())

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.inner)
        keep = next(self.shadow)["input_ids"] > 0  # [1, B*T]
        T, cu = self.inner.seq_len, batch["cu_seqlens"].numpy()
        for start in range(0, keep.shape[1], T):
            end = int(cu[np.searchsorted(cu, start, side="right")])  # the end of the row's first segment
            if not keep[0, start:end].all():  # a cut recall document: its keys may lie in another row
                keep[0, start:end] = False
        batch["labels"] = batch["input_ids"].masked_fill(~keep, -100)
        return batch

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        self.shadow.load_state_dict(state)
