"""Index-sparse softmax attention: the attention half of DeepSeek Sparse Attention (arXiv 2512.02556).

Each query attends only to the keys listed in its row of ``indices`` (as picked by
``lightning_indexer_topk``); the same set serves every query head, so a kernel loads each
gathered key/value row once for all heads. Shapes: q ``[B, Tq, HQ, D]``, k ``[B, Tk, HKV, D]``,
v ``[B, Tk, HKV, DV]``, indices ``[B, Tq, K]`` (``-1`` = empty slot), output ``[B, Tq, HQ, DV]``
and optional lse ``[B, Tq, HQ]``. Query head ``h`` reads kv head ``h // (HQ // HKV)``.
Indices are positions into k/v; with ``cu_seqlens`` (``B == 1``, ``Tq == Tk``) they are
offsets within the query's document. Causality is the caller's job (the indices encode it).
A row's indices may come in any order; position order (what ``lightning_indexer_topk`` returns)
makes the Triton backward's atomic adds land close together, 16-25% faster at 64k-128k tokens
than score order on an H100 (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .backends import (
    check_cu_seqlens,
    compute_dtype,
    get_backend,
    register_backend,
    resolve_backend,
    without_autocast,
)

__all__ = ["sparse_attention"]

# Queries per block in the reference; the block is shrunk so the gathered keys/values stay
# under GATHER_BUDGET elements, i.e. memory O(chunk * K * H * D). Tests lower these.
QUERY_CHUNK = 256
GATHER_BUDGET = 1 << 26


def sparse_attention(q, k, v, indices, *, scale=None, cu_seqlens=None, return_lse=False, backend="auto"):
    """Attention of each query over its selected keys only. See the module docstring for shapes.

    Entries of ``indices`` must be ``-1`` or distinct valid positions; a query with no valid
    index outputs zeros (lse ``-inf``). ``lse`` is the natural-log log-sum-exp of the scaled
    logits over the selected keys, in fp32 (fp64 for fp64 inputs). ``scale`` defaults to ``D**-0.5``.
    Returns ``o`` or ``(o, lse)`` if ``return_lse``.
    """
    _check_inputs(q, k, v, indices, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    features = {
        "device": q.device, "head_dim": q.shape[-1], "head_dim_v": v.shape[-1], "topk": indices.shape[-1],
        "varlen": cu_seqlens is not None, "return_lse": return_lse,
        "requires_grad": torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
    }
    name = resolve_backend("sparse_attention", backend, q.device, q.dtype, features=features)
    fn = get_backend("sparse_attention", name)
    o, lse = fn(q, k, v, indices, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse)
    return (o, lse) if return_lse else o


def _check_inputs(q, k, v, indices, cu_seqlens) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or indices.dim() != 3:
        raise ValueError(
            "sparse_attention: need q [B, Tq, HQ, D], k [B, Tk, HKV, D], v [B, Tk, HKV, DV], indices [B, Tq, K]; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(indices.shape)}"
        )
    B, Tq, HQ, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"sparse_attention: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if HQ % k.shape[2] != 0:
        raise ValueError(f"sparse_attention: query heads ({HQ}) must be a multiple of key/value heads ({k.shape[2]})")
    if tuple(indices.shape[:2]) != (B, Tq):
        raise ValueError(f"sparse_attention: indices must be [B, Tq, K] = [{B}, {Tq}, K], got {tuple(indices.shape)}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"sparse_attention: indices must be an integer tensor, got {indices.dtype}")
    if Tq > k.shape[1]:
        raise ValueError(f"sparse_attention: Tq ({Tq}) > Tk ({k.shape[1]})")
    if cu_seqlens is not None and (B != 1 or Tq != k.shape[1]):
        raise ValueError(f"sparse_attention: cu_seqlens needs B == 1 and Tq == Tk, got B={B}, Tq={Tq}, Tk={k.shape[1]}")


def _absolute_indices(indices: torch.Tensor, cu_seqlens, Tk: int) -> torch.Tensor:
    """Turn per-document offsets into absolute positions (keeping -1) and range-check them."""
    indices = indices.long()
    if cu_seqlens is not None:
        offsets = check_cu_seqlens(cu_seqlens, Tk, "sparse_attention")
        starts = torch.tensor(offsets[:-1], device=indices.device)
        lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=indices.device)
        start = torch.repeat_interleave(starts, lengths)  # [T]
        length = torch.repeat_interleave(lengths, lengths)  # [T]: each query's document length
        if indices.numel() and bool((indices >= length[None, :, None]).any()):
            raise ValueError("sparse_attention: with cu_seqlens, indices are offsets into the query's own document "
                             "and must be -1 or below that document's length; an offset past it would read the "
                             "next document")
        indices = torch.where(indices >= 0, indices + start[None, :, None], indices)
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= Tk):
        raise ValueError(f"sparse_attention: indices must be -1 or in [0, {Tk}) (positions into k/v)")
    return indices


def _gather_block(qc, k, v, idx, scale):
    """One block of queries: qc [B, c, HQ, D], idx [B, c, K] absolute (-1 = empty)."""
    B, c, HQ, D = qc.shape
    Tk, HKV, DV = k.shape[1], k.shape[2], v.shape[-1]
    K = idx.shape[-1]
    cdt = compute_dtype(qc.dtype)
    valid = idx >= 0
    rows = (idx.clamp(min=0) + Tk * torch.arange(B, device=idx.device)[:, None, None]).reshape(-1)
    kg = k.reshape(B * Tk, HKV, D)[rows].view(B, c, K, HKV, D).to(cdt)
    vg = v.reshape(B * Tk, HKV, DV)[rows].view(B, c, K, HKV, DV).to(cdt)
    qg = qc.to(cdt).view(B, c, HKV, HQ // HKV, D)  # [B, c, HKV, G, D]
    s = torch.einsum("bchgd,bckhd->bchgk", qg, kg) * scale  # [B, c, HKV, G, K]
    s = s.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    # The max only stabilises exp(); detaching it leaves o and lse exact and their gradients intact.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.einsum("bchgk,bckhd->bchgd", p / safe, vg).reshape(B, c, HQ, DV)
    lse = torch.where(denom > 0, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return o.to(qc.dtype), lse.reshape(B, c, HQ)


@without_autocast
def _sparse_reference(q, k, v, indices, *, scale, cu_seqlens=None, return_lse=False):
    B, Tq, HQ, D = q.shape
    Tk, HKV, DV = k.shape[1], k.shape[2], v.shape[-1]
    idx = _absolute_indices(indices, cu_seqlens, Tk)
    if idx.shape[-1] == 0:
        lse = torch.full((B, Tq, HQ), float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
        return q.new_zeros(B, Tq, HQ, DV), lse
    chunk = max(1, min(QUERY_CHUNK, GATHER_BUDGET // max(1, B * idx.shape[-1] * HKV * (D + DV))))
    remat = Tq > chunk and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs, lses = [], []
    for t0 in range(0, Tq, chunk):
        args = (q[:, t0:t0 + chunk], k, v, idx[:, t0:t0 + chunk], scale)
        o, lse = checkpoint(_gather_block, *args, use_reentrant=False) if remat else _gather_block(*args)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


register_backend("sparse_attention", "reference", _sparse_reference, priority=0)
