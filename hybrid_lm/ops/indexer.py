"""Lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv 2512.02556): scores and top-k.

For query token t and key token s: ``I[t, s] = sum_j w[t, j] * relu(q_idx[t, j] . k_idx[s])``,
computed in fp32 (any scale is already folded into ``w``). One index key per token is shared by
all ``HI`` indexer heads. Shapes: q_idx ``[B, Tq, HI, DI]``, k_idx ``[B, Tk, DI]``,
weights ``[B, Tq, HI]``. Queries are the last ``Tq`` key positions (bottom-right causal
alignment, like ``attention``); with ``cu_seqlens`` (``B == 1``, ``Tq == Tk``) a query sees only
keys of its own document and top-k indices are offsets within that document (as fla does).
"""

from __future__ import annotations

import torch

from .backends import (
    check_cu_seqlens,
    compute_dtype,
    get_backend,
    register_backend,
    resolve_backend,
    without_autocast,
)

__all__ = ["lightning_indexer_scores", "lightning_indexer_topk", "position_order"]

# Query rows per block in the reference top-k, shrunk so the [B, rows, HI, keys] logits stay
# under SCORE_BUDGET elements (no [T, T] tensor at long context). Tests lower these.
QUERY_CHUNK = 512
SCORE_BUDGET = 1 << 26


def _check_inputs(q_idx, k_idx, weights, cu_seqlens, op: str) -> None:
    if q_idx.dim() != 4 or k_idx.dim() != 3 or weights.dim() != 3:
        raise ValueError(
            f"{op}: need q_idx [B, Tq, HI, DI], k_idx [B, Tk, DI], weights [B, Tq, HI]; got "
            f"{tuple(q_idx.shape)}, {tuple(k_idx.shape)}, {tuple(weights.shape)}"
        )
    B, Tq, HI, DI = q_idx.shape
    if k_idx.shape[0] != B or k_idx.shape[2] != DI or tuple(weights.shape) != (B, Tq, HI):
        raise ValueError(
            f"{op}: shapes disagree: q_idx {tuple(q_idx.shape)}, k_idx {tuple(k_idx.shape)}, "
            f"weights {tuple(weights.shape)}"
        )
    Tk = k_idx.shape[1]
    if Tq > Tk:
        raise ValueError(f"{op}: Tq ({Tq}) > Tk ({Tk}); queries must be the last Tq key positions")
    if cu_seqlens is not None and (B != 1 or Tq != Tk):
        raise ValueError(f"{op}: cu_seqlens needs B == 1 and Tq == Tk, got B={B}, Tq={Tq}, Tk={Tk}")


def _scores(q_idx, k_idx, weights):
    """[B, c, L] index scores of every query row against every given key (no masking)."""
    cdt = compute_dtype(q_idx.dtype)
    logits = torch.einsum("bthd,bsd->bths", q_idx.to(cdt), k_idx.to(cdt)).relu()  # [B, c, HI, L]
    return torch.einsum("bths,bth->bts", logits, weights.to(cdt))


def _document_ids(offsets: list[int], device) -> torch.Tensor:
    lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


@without_autocast
def lightning_indexer_scores(q_idx, k_idx, weights, *, cu_seqlens=None):
    """Full index scores ``[B, Tq, Tk]`` in fp32 (fp64 for fp64 inputs), ``-inf`` where not visible.

    Materialises O(Tq * Tk * HI): for tests, losses on short sequences and debugging only.
    Differentiable in all three inputs.
    """
    _check_inputs(q_idx, k_idx, weights, cu_seqlens, "lightning_indexer_scores")
    Tq, Tk = q_idx.shape[1], k_idx.shape[1]
    scores = _scores(q_idx, k_idx, weights)
    q_pos = torch.arange(Tk - Tq, Tk, device=q_idx.device)
    k_pos = torch.arange(Tk, device=q_idx.device)
    visible = k_pos[None, :] <= q_pos[:, None]
    if cu_seqlens is not None:
        doc = _document_ids(check_cu_seqlens(cu_seqlens, Tk, "lightning_indexer_scores"), q_idx.device)
        visible &= doc[None, :] == doc[:, None]
    return scores.masked_fill(~visible, float("-inf"))


def lightning_indexer_topk(q_idx, k_idx, weights, topk, *, cu_seqlens=None, backend="auto"):
    """Indices ``[B, Tq, topk]`` (int64) of each query's ``topk`` highest-scoring visible keys.

    Valid indices come first, in ascending key position (the order the sparse attention gathers
    and scatters best in); rows with fewer than ``topk`` visible keys are padded with ``-1``. With
    ``cu_seqlens`` the indices are offsets within the query's document. Among keys tied at the
    k-th score the reference keeps the earliest; fast backends may keep other tied keys.
    """
    _check_inputs(q_idx, k_idx, weights, cu_seqlens, "lightning_indexer_topk")
    if int(topk) < 1:
        raise ValueError(f"lightning_indexer_topk: topk must be >= 1, got {topk}")
    features = {
        "device": q_idx.device, "heads": q_idx.shape[2], "head_dim": q_idx.shape[3], "topk": int(topk),
        "varlen": cu_seqlens is not None,
    }
    name = resolve_backend("lightning_indexer_topk", backend, q_idx.device, q_idx.dtype, features=features)
    fn = get_backend("lightning_indexer_topk", name)
    return fn(q_idx, k_idx, weights, int(topk), cu_seqlens=cu_seqlens)


def position_order(idx: torch.Tensor) -> torch.Tensor:
    """Each row of -1-padded top-k indices with its valid entries in ascending position, the -1s last."""
    big = torch.iinfo(idx.dtype).max
    ordered = torch.where(idx < 0, big, idx).sort(dim=-1).values
    return ordered.masked_fill_(ordered == big, -1)


def select_topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """[..., topk] int64 positions of the `topk` best of score rows [..., L] (-inf = not visible), in position
    order, -1 padded. A stable sort breaks exact ties (common: relu zeroes whole rows of head scores) towards the
    earlier key, so a token selects the same keys in a full forward and in cached decoding."""
    kk = min(topk, scores.shape[-1])
    vals, idx = scores.sort(dim=-1, descending=True, stable=True)
    idx = position_order(idx[..., :kk].masked_fill(vals[..., :kk] == float("-inf"), -1))
    return torch.nn.functional.pad(idx, (0, topk - kk), value=-1)


def _topk_dense(q_idx, k_idx, weights, topk: int) -> torch.Tensor:
    B, Tq, HI, _ = q_idx.shape
    Tk = k_idx.shape[1]
    offset = Tk - Tq
    out = torch.full((B, Tq, topk), -1, dtype=torch.long, device=q_idx.device)
    chunk = max(1, min(QUERY_CHUNK, SCORE_BUDGET // max(1, B * HI * Tk)))
    for t0 in range(0, Tq, chunk):
        t1 = min(Tq, t0 + chunk)
        hi = offset + t1  # causal: this block sees keys [0, hi)
        scores = _scores(q_idx[:, t0:t1], k_idx[:, :hi], weights[:, t0:t1])  # [B, c, hi]
        q_pos = torch.arange(offset + t0, offset + t1, device=q_idx.device)
        future = torch.arange(hi, device=q_idx.device)[None, :] > q_pos[:, None]
        out[:, t0:t1] = select_topk(scores.masked_fill(future, float("-inf")), topk)
    return out


@torch.no_grad()
@without_autocast
def _topk_reference(q_idx, k_idx, weights, topk, *, cu_seqlens=None):
    if cu_seqlens is None:
        return _topk_dense(q_idx, k_idx, weights, topk)
    offsets = check_cu_seqlens(cu_seqlens, q_idx.shape[1], "lightning_indexer_topk")
    out = torch.full((1, q_idx.shape[1], topk), -1, dtype=torch.long, device=q_idx.device)
    for s, e in zip(offsets, offsets[1:]):
        if e > s:
            out[:, s:e] = _topk_dense(q_idx[:, s:e], k_idx[:, s:e], weights[:, s:e], topk)
    return out


register_backend("lightning_indexer_topk", "reference", _topk_reference, priority=0)
