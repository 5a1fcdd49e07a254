"""Scoring a model: teacher-forced recall accuracy, perplexity at a context length, and the DSA top-k knob.

Recall is scored teacher-forced: an answer counts when the argmax of the logits before each of its tokens is that
token. For greedy decoding this is the same test as an exact match of the continuation (each greedy step would
produce the teacher's token), at the cost of one forward pass. Shapes: `ids [B, T]`, `logits [B, T, V]`.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .tasks import RecallSample


def _batches(n_items: int, length: int, batch_tokens: int):
    """Row ranges so that one forward holds about `batch_tokens` tokens (at least one row)."""
    rows = max(1, batch_tokens // length)
    return [(i, min(n_items, i + rows)) for i in range(0, n_items, rows)]


@torch.no_grad()
def recall_correct(model, samples: list[RecallSample], device="cpu", batch_tokens: int = 16384) -> tuple[int, int]:
    """(answers right, answers asked) over samples that all have the same length."""
    lengths = {len(s.input_ids) for s in samples}
    assert len(lengths) == 1, f"samples of one cell share a length, got {sorted(lengths)}"
    length = lengths.pop()
    right = asked = 0
    for lo, hi in _batches(len(samples), length, batch_tokens):
        ids = torch.from_numpy(np.stack([s.input_ids for s in samples[lo:hi]])).to(device)  # [B, T]
        logits = model(ids).logits
        for row, sample in enumerate(samples[lo:hi]):
            for positions in sample.answers:
                pos = torch.as_tensor(positions, device=device)
                guess = logits[row, pos - 1].argmax(-1)
                right += int(torch.equal(guess, ids[row, pos]))
                asked += 1
    return right, asked


@torch.no_grad()
def perplexity(model, text: np.ndarray, length: int, max_tokens: int, device="cpu",
               batch_tokens: int = 16384) -> dict:
    """Next-token loss over non-overlapping windows of `length` tokens of `text` (at most `max_tokens` tokens).

    `loss` averages every prediction; `tail_loss` only those with at least length/2 tokens of context, where a
    model that does not extrapolate past its training length breaks down first.
    """
    windows = min(len(text) // length, max(1, max_tokens // length))
    if windows == 0:
        raise ValueError(f"the held-out text has {len(text)} tokens, fewer than one window of {length}")
    rows = torch.from_numpy(np.asarray(text[:windows * length], dtype=np.int64).reshape(windows, length))
    total = tail = 0.0
    half = length // 2
    for lo, hi in _batches(windows, length, batch_tokens):
        ids = rows[lo:hi].to(device)  # [B, T]
        logits = model(ids).logits[:, :-1].float()  # [B, T-1, V]: position t predicts t + 1
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        nll = nll.view(hi - lo, length - 1)
        total += float(nll.sum())
        tail += float(nll[:, half - 1:].sum())
    n, n_tail = windows * (length - 1), windows * (length - half)
    loss = total / n
    return {"loss": loss, "ppl": float(np.exp(loss)), "tail_loss": tail / n_tail, "windows": windows,
            "tokens": windows * length}


def dsa_topks(model) -> list[int]:
    return sorted({layer.topk for layer in model._dsa_layers()})


@contextmanager
def dsa_topk(model, topk: int | None):
    """Every DSA layer keeps `topk` keys per query inside the block (None: leave the trained setting)."""
    layers = model._dsa_layers()
    if topk is not None and not layers:
        raise ValueError("a top-k sweep needs DSA layers, but this model has none")
    if topk is not None and topk < 1:
        raise ValueError(f"topk = {topk}: must be >= 1")
    saved = [layer.topk for layer in layers]
    try:
        for layer in layers:
            layer.topk = topk if topk is not None else layer.topk
        yield
    finally:
        for layer, k in zip(layers, saved):
            layer.topk = k
