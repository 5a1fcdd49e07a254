"""Packed batches: rows of T consecutive tokens of the document stream, with document boundaries as cu_seqlens.

Shape letters: B rows per batch (per rank), T = seq_len, W = world_size.

A batch is ``B`` rows flattened into one packed sequence ``input_ids [1, B*T]``. ``cu_seqlens`` marks where a
segment starts: at every row start and right after every eos, so an eos is always the last token of its segment
and the model (which masks attention, recurrent state and next-token predictions across these boundaries) never
lets one document see or predict another. ``labels`` equal ``input_ids``; the model shifts them itself.

Each epoch cuts the stream into rows at a seeded random offset and visits them in a seeded random order; rank r
of W takes rows ``[r*B, (r+1)*B)`` of every group of ``W*B``, so ranks never share a row. Everything follows from
(seed, epoch, position), which is what ``state_dict`` stores.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

_STATE_VERSION = 1


def _batch(rows: np.ndarray, eos_id: int) -> dict:
    """rows [B, T] of token ids -> the packed batch dict."""
    n_rows, seq_len = rows.shape
    starts = np.zeros(rows.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = rows[:, :-1] == eos_id
    cu = np.append(np.flatnonzero(starts.reshape(-1)), n_rows * seq_len)  # [N+1]
    ids = torch.from_numpy(rows.astype(np.int64).reshape(1, -1))  # [1, B*T]
    return {"input_ids": ids, "labels": ids.clone(), "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
            "num_tokens": int(ids.numel())}


def _check_args(tokens: np.ndarray, seq_len: int, batch_size: int, eos_id: int) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D token stream, got shape {tokens.shape}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
    if eos_id < 0:
        raise ValueError(f"eos_id={eos_id} must be a token id (>= 0)")


class PackedBatches:
    """Infinite, deterministic, resumable iterator of packed training batches (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, eos_id: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        _check_args(tokens, seq_len, batch_size, eos_id)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        # the smallest epoch (largest random offset) must still fill one step of every rank
        min_rows = (len(tokens) - (seq_len - 1 if shuffle else 0)) // seq_len
        if min_rows < world_size * batch_size:
            raise ValueError(
                f"{len(tokens)} tokens are too few for world_size*batch_size={world_size * batch_size} rows of "
                f"seq_len={seq_len} (plus up to seq_len-1 for the random offset); use more data or smaller "
                f"seq_len/batch_size")
        self.tokens, self.seq_len, self.batch_size, self.eos_id = tokens, seq_len, batch_size, eos_id
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.epoch = 0
        self.position = 0  # rows of the current epoch's order already handed out, over all ranks
        self._order: np.ndarray | None = None  # row start offsets of the current epoch, in visiting order

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        step_rows = self.world_size * self.batch_size
        order = self._epoch_order()
        if self.position + step_rows > len(order):
            # the partial last step of an epoch is dropped so every rank always gets a full batch
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
            order = self._epoch_order()
        first = self.position + self.rank * self.batch_size
        starts = order[first:first + self.batch_size]
        self.position += step_rows
        rows = self.tokens[starts[:, None] + np.arange(self.seq_len)]  # [B, T]
        return _batch(np.asarray(rows), self.eos_id)

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                offset = int(rng.integers(self.seq_len))
                n_rows = (len(self.tokens) - offset) // self.seq_len
                self._order = offset + rng.permutation(n_rows) * self.seq_len
            else:
                self._order = np.arange(len(self.tokens) // self.seq_len) * self.seq_len
        return self._order

    @property
    def rows_per_epoch(self) -> int:
        return len(self._epoch_order())

    def state_dict(self) -> dict:
        """JSON-serialisable position; load it into a PackedBatches over the same tokens to resume exactly."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "num_tokens": int(len(self.tokens)), "shuffle": self.shuffle,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``. The global position carries over even if batch_size or world_size changed."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} != {_STATE_VERSION}; cannot resume")
        for key in ("seed", "seq_len", "num_tokens", "shuffle"):
            mine = int(len(self.tokens)) if key == "num_tokens" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(f"cannot resume data position: checkpoint has {key}={state[key]!r} but this run "
                                 f"has {mine!r}; the row order would differ")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def iter_eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, eos_id: int,
                      max_batches: int | None = None) -> Iterator[dict]:
    """Sequential, non-overlapping rows over the whole stream (the tail shorter than seq_len is skipped).

    The last batch may have fewer than ``batch_size`` rows. Same batch format as ``PackedBatches``.
    """
    # checked here, not inside the generator, so a bad call fails at the call site
    _check_args(tokens, seq_len, batch_size, eos_id)
    if 0 < len(tokens) < seq_len:
        raise ValueError(f"the eval split has {len(tokens)} tokens, fewer than seq_len={seq_len}; raise "
                         f"data.val_fraction or lower seq_len")
    n_rows = len(tokens) // seq_len
    firsts = range(0, n_rows, batch_size)[:max_batches]
    return (_eval_batch(tokens, first, min(first + batch_size, n_rows), seq_len, eos_id) for first in firsts)


def _eval_batch(tokens: np.ndarray, first: int, last: int, seq_len: int, eos_id: int) -> dict:
    rows = np.asarray(tokens[first * seq_len:last * seq_len]).reshape(last - first, seq_len)  # [B, T]
    return _batch(rows, eos_id)
