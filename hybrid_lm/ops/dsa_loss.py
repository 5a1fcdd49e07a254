"""Training losses for the DSA lightning indexer (DeepSeek-V3.2, arXiv 2512.02556, section 2).

The indexer scores key s for query t as `I[t,s] = sum_j w[t,j] * relu(q_idx[t,j] . k_idx[s])` and is trained to
match the main attention's head-averaged distribution `p[t,:]` (per-head softmax rows, averaged over heads):

- stage 1 (dense warm-up): `mean_t KL(p[t,:] || softmax(I[t,:]))` over every visible key;
- stage 2 (sparse): the same KL restricted to the selected set S_t, both sides renormalised over S_t;
- `attention_recall`: the share of the dense mass p[t,:] that falls on S_t (a diagnostic, no gradient).

q and k (the main attention's) are constants: the target never carries a gradient. Gradients reach only
q_idx, k_idx and weights, through `dKL/dI = softmax(I) - p` and the relu.

Memory: nothing is ever [T, T]. Queries are processed in blocks of `block` rows against the keys they can see, so
the largest temporaries are [B, block, H, T] (H = indexer heads or query heads of one KV group). The custom
autograd Functions save only their inputs and recompute each block in backward (flash-attention style), so the
saved state is O(T) as well. Stage 2 gathers [B, block, K, D] keys per block instead.

Visibility: key s is visible to query t when s <= t and, with `cu_seqlens` (B == 1, int [N+1] cumulative document
lengths, packed layout), s lies in t's document. Every query sees at least itself, so no row is empty.

Shapes (fla's layout): B batch, T tokens, HQ / HKV main query / key heads (GQA: head h uses KV head
h // (HQ // HKV)), D head dim, HI / DI indexer heads / dim, K selected keys per query.
Computation runs in fp32 (float64 when the inputs are float64); losses are fp32 scalars (float64 for float64
inputs, so gradients can be checked tightly).
"""

from bisect import bisect_right

import torch

from .backends import autocast_off, get_backend, register_backend, resolve_backend

__all__ = ["indexer_kl_dense", "indexer_kl_sparse", "attention_recall"]


def _compute_dtype(*tensors):
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_attention(q, k, cu_seqlens, block):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, HQ, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in B, T and D")
    if HQ % k.shape[2] != 0:
        raise ValueError(f"query heads ({HQ}) must be a multiple of key heads ({k.shape[2]})")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if cu_seqlens is None:
        return None
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed input with batch size 1, got B={B}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N+1] of cumulative document lengths")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T} without decreasing, got {cu}")
    return cu


def _check_indexer(q, q_idx, k_idx, weights):
    B, T = q.shape[:2]
    if q_idx.dim() != 4 or q_idx.shape[:2] != (B, T):
        raise ValueError(f"q_idx must be [B={B}, T={T}, HI, DI], got {tuple(q_idx.shape)}")
    HI, DI = q_idx.shape[2:]
    if tuple(k_idx.shape) != (B, T, DI):
        raise ValueError(f"k_idx must be [B, T, DI] = {(B, T, DI)}, got {tuple(k_idx.shape)}")
    if tuple(weights.shape) != (B, T, HI):
        raise ValueError(f"weights must be [B, T, HI] = {(B, T, HI)}, got {tuple(weights.shape)}")


def _check_indices(q, indices):
    if indices.dim() != 3 or indices.shape[:2] != q.shape[:2] or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be an integer tensor [B, T, K] with B, T of q {tuple(q.shape[:2])}, "
                         f"got {indices.dtype} {tuple(indices.shape)}")


def _blocks(T, block, cu):
    """Yield (t0, t1, k0): a query block and the first key any of its rows can see."""
    for t0 in range(0, T, block):
        k0 = 0 if cu is None else cu[bisect_right(cu, t0) - 1]
        yield t0, min(t0 + block, T), k0


def _doc_info(cu, T, device):
    """Per-token document id and document start [T] (all zeros without cu_seqlens)."""
    if cu is None:
        zeros = torch.zeros(T, dtype=torch.long, device=device)
        return zeros, zeros
    cu_t = torch.tensor(cu, dtype=torch.long, device=device)
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), cu_t.diff(), output_size=T)
    return doc, cu_t[doc]


def _dense_visible(t0, t1, k0, doc):
    """[Bq, Tk] bool: key k0 + s is visible to query t0 + r."""
    t = torch.arange(t0, t1, device=doc.device)
    s = torch.arange(k0, t1, device=doc.device)
    return (s[None, :] <= t[:, None]) & (doc[k0:t1][None, :] == doc[t0:t1][:, None])


def _sparse_keys(indices, t0, t1, doc_start):
    """Absolute key positions [B, Bq, K] (0 where invalid) and their validity mask."""
    idx = indices[:, t0:t1].long()
    t = torch.arange(t0, t1, device=idx.device)[None, :, None]
    pos = idx + doc_start[t0:t1][None, :, None]
    valid = (idx >= 0) & (pos <= t)
    return torch.where(valid, pos, 0), valid


def _dense_target(q, k, t0, t1, k0, visible, scale, dtype):
    """Head-averaged attention probabilities [B, Bq, Tk] of query block t0:t1 over keys k0:t1."""
    HQ, HKV = q.shape[2], k.shape[2]
    G = HQ // HKV
    qb = q[:, t0:t1].to(dtype).unflatten(2, (HKV, G))  # [B, Bq, HKV, G, D]
    kb = k[:, k0:t1].to(dtype)  # [B, Tk, HKV, D]
    p = 0
    # one KV group at a time keeps the temporaries at [B, G, Bq, Tk]
    for h in range(HKV):
        s = torch.einsum("bqgd,bkd->bgqk", qb[:, :, h], kb[:, :, h]) * scale
        s = s.masked_fill(~visible, float("-inf"))
        p = p + s.softmax(-1).sum(1)
    return p / HQ


def _sparse_target(q, k, pos, valid, t0, t1, scale, attn_lse, dtype):
    """Head-averaged attention probabilities [B, Bq, K] over each query's selected keys, L1-normalised."""
    B, _, HQ, _ = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    qb = q[:, t0:t1].to(dtype).unflatten(2, (HKV, G))  # [B, Bq, HKV, G, D]
    bidx = torch.arange(B, device=q.device)[:, None, None]
    p = 0
    for h in range(HKV):
        kg = k[:, :, h][bidx, pos].to(dtype)  # [B, Bq, K, D]
        s = torch.einsum("bqgd,bqkd->bqgk", qb[:, :, h], kg) * scale
        s = s.masked_fill(~valid[:, :, None], float("-inf"))
        if attn_lse is None:
            ph = s.softmax(-1)
        else:
            ph = (s - attn_lse[:, t0:t1, h * G:(h + 1) * G, None].to(dtype)).exp()  # [B, Bq, G, K]
        p = p + ph.sum(2)
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 0, p / total.clamp_min(torch.finfo(dtype).tiny), 0.0)


def _index_logits(qi, ki, w):
    """Indexer logits [B, Bq, S] and pre-relu dots [B, Bq, HI, S].

    ki is [B, S, DI] (keys shared by the block) or [B, Bq, S, DI] (keys gathered per query)."""
    pattern = "bqjd,bsd->bqjs" if ki.dim() == 3 else "bqjd,bqsd->bqjs"
    dot = torch.einsum(pattern, qi, ki)
    return torch.einsum("bqj,bqjs->bqs", w, dot.relu()), dot


def _index_logits_backward(dI, qi, ki, w, dot):
    """Chain dL/dI [B, Bq, S] back to (qi, ki, w) through the weighted relu."""
    dw = torch.einsum("bqs,bqjs->bqj", dI, dot.relu())
    ddot = dI[:, :, None, :] * w[..., None] * (dot > 0)  # [B, Bq, HI, S]
    if ki.dim() == 3:
        dqi = torch.einsum("bqjs,bsd->bqjd", ddot, ki)
        dki = torch.einsum("bqjs,bqjd->bsd", ddot, qi)
    else:
        dqi = torch.einsum("bqjs,bqsd->bqjd", ddot, ki)
        dki = torch.einsum("bqjs,bqjd->bqsd", ddot, qi)
    return dqi, dki, dw


def _block_kl(p, logits, mask):
    """Per-row KL(p || softmax(logits)) [B, Bq] over mask, and softmax(logits) [B, Bq, S]."""
    logq = logits.masked_fill(~mask, float("-inf")).log_softmax(-1)
    # log q is finite wherever p can be > 0; masked terms are 0 * log 0 := 0
    terms = torch.xlogy(p, p) - p * logq.masked_fill(~mask, 0.0)
    return terms.sum(-1), logq.exp()


class _IndexerKL(torch.autograd.Function):
    """Blockwise KL, recomputed block by block in backward. indices None: stage 1 (all visible keys), else stage 2."""

    @staticmethod
    def forward(ctx, q, k, q_idx, k_idx, weights, indices, attn_lse, scale, cu, block):
        ctx.save_for_backward(q, k, q_idx, k_idx, weights, indices, attn_lse)
        ctx.args = (scale, cu, block)
        total = torch.zeros((), dtype=_compute_dtype(q_idx, k_idx, weights), device=q.device)
        with autocast_off(q):
            for _, kl in _IndexerKL._sweep(ctx, q, k, q_idx, k_idx, weights, indices, attn_lse, need_grad=False):
                total = total + kl
        return total / (q.shape[0] * q.shape[1])

    @staticmethod
    def _sweep(ctx, q, k, q_idx, k_idx, weights, indices, attn_lse, need_grad):
        """Yield per block ((dI-inputs), summed KL): the shared forward/backward recomputation."""
        scale, cu, block = ctx.args
        B, T = q.shape[:2]
        dtype = _compute_dtype(q_idx, k_idx, weights)
        doc, doc_start = _doc_info(cu, T, q.device)
        bidx = torch.arange(B, device=q.device)[:, None, None]
        for t0, t1, k0 in _blocks(T, block, cu):
            qi, w = q_idx[:, t0:t1].to(dtype), weights[:, t0:t1].to(dtype)
            if indices is None:
                mask = _dense_visible(t0, t1, k0, doc)[None]  # [1, Bq, Tk]
                p = _dense_target(q, k, t0, t1, k0, mask[:, None], scale, dtype)
                ki, keys = k_idx[:, k0:t1].to(dtype), k0
            else:
                pos, mask = _sparse_keys(indices, t0, t1, doc_start)
                p = _sparse_target(q, k, pos, mask, t0, t1, scale, attn_lse, dtype)
                ki, keys = k_idx[bidx, pos].to(dtype), pos  # [B, Bq, K, DI]
            logits, dot = _index_logits(qi, ki, w)
            kl, soft = _block_kl(p, logits, mask)
            state = (t0, t1, keys, qi, ki, w, dot, (soft - p).masked_fill(~mask, 0.0)) if need_grad else None
            yield state, kl.sum()

    @staticmethod
    def backward(ctx, grad):
        q, k, q_idx, k_idx, weights, indices, attn_lse = ctx.saved_tensors
        dtype = _compute_dtype(q_idx, k_idx, weights)
        B, T, DI = k_idx.shape
        dq_idx = torch.zeros(q_idx.shape, dtype=dtype, device=q.device)
        dk_idx = torch.zeros(k_idx.shape, dtype=dtype, device=q.device)
        dw = torch.zeros(weights.shape, dtype=dtype, device=q.device)
        g = grad.to(dtype) / (B * T)
        with torch.no_grad(), autocast_off(q):  # on the CPU the backward runs in the forward's (autocast) thread
            for state, _ in _IndexerKL._sweep(ctx, q, k, q_idx, k_idx, weights, indices, attn_lse, True):
                t0, t1, keys, qi, ki, w, dot, dI = state
                dqi, dki, dwi = _index_logits_backward(dI * g, qi, ki, w, dot)
                dq_idx[:, t0:t1] = dqi
                dw[:, t0:t1] = dwi
                if indices is None:
                    dk_idx[:, keys:t1] += dki
                else:
                    # duplicates and invalid slots (dI == 0 there) accumulate correctly via index_add
                    flat = (keys + torch.arange(B, device=q.device)[:, None, None] * T).flatten()
                    dk_idx.view(B * T, DI).index_add_(0, flat, dki.flatten(0, 2))
        return (None, None, dq_idx.to(q_idx.dtype), dk_idx.to(k_idx.dtype), dw.to(weights.dtype),
                None, None, None, None, None)


def indexer_kl_dense(q, k, q_idx, k_idx, weights, *, scale=None, cu_seqlens=None, block=256, backend="auto"):
    """Stage-1 loss `mean_t KL(p[t,:] || softmax(I[t,:]))` over all visible keys.

    q [B,T,HQ,D], k [B,T,HKV,D] (no gradient); q_idx [B,T,HI,DI], k_idx [B,T,DI], weights [B,T,HI] (trained;
    any score scale already folded into weights). scale defaults to D**-0.5. Memory O(HI * T * block) in the
    reference (``block`` sets its query block); the Triton backend streams over keys in O(T) memory."""
    _check_attention(q, k, cu_seqlens, block)
    _check_indexer(q, q_idx, k_idx, weights)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = resolve_backend("indexer_kl_dense", backend, q.device, q.dtype, features={"device": q.device})
    return get_backend("indexer_kl_dense", name)(q.detach(), k.detach(), q_idx, k_idx, weights, scale=scale,
                                                 cu_seqlens=cu_seqlens, block=block)


def indexer_kl_sparse(q, k, q_idx, k_idx, weights, indices, *, scale=None, cu_seqlens=None, attn_lse=None,
                      block=256, forward_recomputed=False, backend="auto"):
    """Stage-2 loss `mean_t KL(p_S[t] || softmax_S(I[t]))` over each query's selected keys S_t.

    indices [B,T,K]: selected key positions (offsets within the document with cu_seqlens); -1 pads, and entries
    not visible to t (future keys, other documents) are ignored too. Rows should hold no duplicates (top-k gives
    none). p_S is the per-head attention softmax over S_t averaged over heads; attn_lse [B,T,HQ], the sparse
    attention's natural-log sum of exp(scale * q.k) over S_t, skips recomputing it (the Triton backend needs
    it). Memory O(block * K * D) in the reference, O(T) in the Triton backend. forward_recomputed: the caller's
    forward runs again in the backward (activation checkpointing), so a backend should not do backward work in
    the forward (the Triton backend's one-sweep gradients); the result is the same either way."""
    _check_attention(q, k, cu_seqlens, block)
    _check_indexer(q, q_idx, k_idx, weights)
    _check_indices(q, indices)
    if attn_lse is not None and tuple(attn_lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"attn_lse must be [B, T, HQ] = {tuple(q.shape[:3])}, got {tuple(attn_lse.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    lse = None if attn_lse is None else attn_lse.detach()
    name = resolve_backend("indexer_kl_sparse", backend, q.device, q.dtype,
                           features={"device": q.device, "attn_lse": lse is not None})
    return get_backend("indexer_kl_sparse", name)(q.detach(), k.detach(), q_idx, k_idx, weights, indices,
                                                  scale=scale, cu_seqlens=cu_seqlens, attn_lse=lse, block=block,
                                                  forward_recomputed=bool(forward_recomputed))


def _cu_list(cu_seqlens):
    return None if cu_seqlens is None else cu_seqlens.tolist()  # already checked by the op


def _kl_dense_reference(q, k, q_idx, k_idx, weights, *, scale, cu_seqlens=None, block=256):
    return _IndexerKL.apply(q, k, q_idx, k_idx, weights, None, None, scale, _cu_list(cu_seqlens), block)


def _kl_sparse_reference(q, k, q_idx, k_idx, weights, indices, *, scale, cu_seqlens=None, attn_lse=None,
                         block=256, forward_recomputed=False):  # the reference differentiates in the backward
    return _IndexerKL.apply(q, k, q_idx, k_idx, weights, indices, attn_lse, scale, _cu_list(cu_seqlens), block)


register_backend("indexer_kl_dense", "reference", _kl_dense_reference, priority=0)
register_backend("indexer_kl_sparse", "reference", _kl_sparse_reference, priority=0)


@torch.no_grad()
def attention_recall(q, k, indices, *, scale=None, cu_seqlens=None, block=256):
    """Mean over query tokens of the dense head-averaged attention mass p[t,:] that lies on the selected keys.

    indices [B,T,K] as in `indexer_kl_sparse` (duplicates count once). 1.0 means the selection loses nothing."""
    cu = _check_attention(q, k, cu_seqlens, block)
    _check_indices(q, indices)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    B, T = q.shape[:2]
    dtype = _compute_dtype(q)
    doc, doc_start = _doc_info(cu, T, q.device)
    total = torch.zeros((), dtype=dtype, device=q.device)
    with autocast_off(q):
        for t0, t1, k0 in _blocks(T, block, cu):
            visible = _dense_visible(t0, t1, k0, doc)
            p = _dense_target(q, k, t0, t1, k0, visible[None, None], scale, dtype)  # [B, Bq, Tk]
            pos, valid = _sparse_keys(indices, t0, t1, doc_start)
            # valid positions lie in k0:t1; a scatter-add mask makes duplicate indices count once
            hit = torch.zeros_like(p).scatter_add_(-1, (pos - k0).clamp_min(0), valid.to(dtype)) > 0
            total = total + (p * hit).sum()
    return total / (B * T)


def _naive_visible(T, cu_seqlens, device):
    """[T, T] bool causal (and same-document) mask, built independently of the blockwise helpers."""
    t = torch.arange(T, device=device)
    visible = t[None, :] <= t[:, None]
    if cu_seqlens is not None:
        doc = torch.bucketize(t, cu_seqlens[1:].to(device), right=True)
        visible &= doc[None, :] == doc[:, None]
    return visible


def _naive_selected(indices, cu_seqlens):
    """[B, T, T] bool: key s is selected by, and visible to, query t."""
    B, T, _ = indices.shape
    start = torch.zeros(T, dtype=torch.long, device=indices.device)
    if cu_seqlens is not None:
        doc = torch.bucketize(torch.arange(T, device=indices.device), cu_seqlens[1:], right=True)
        start = cu_seqlens.long()[doc]
    pos = indices.long() + start[None, :, None]
    pos = torch.where((indices >= 0) & (pos < T), pos, T)  # invalid slots land in a dropped column
    sel = torch.zeros(B, T, T + 1, dtype=torch.bool, device=indices.device).scatter_(-1, pos, True)
    return sel[..., :T] & _naive_visible(T, cu_seqlens, indices.device)


def _naive_probs(q, k, allowed, scale, dtype):
    """Head-averaged softmax [B, T, T] over the allowed keys (rows with none are 0)."""
    kk = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.to(dtype), kk.to(dtype)) * scale
    return s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)


def _naive_kl(p, q_idx, k_idx, weights, allowed):
    dtype = p.dtype
    dot = torch.einsum("bthd,bsd->bths", q_idx.to(dtype), k_idx.to(dtype))
    logits = torch.einsum("bth,bths->bts", weights.to(dtype), dot.relu())
    # a finite fill keeps rows with no allowed key NaN-free (their p is 0, so they add nothing)
    logq = logits.masked_fill(~allowed, torch.finfo(dtype).min).log_softmax(-1)
    terms = torch.xlogy(p, p) - torch.where(allowed, p * logq, 0.0)
    return terms.sum() / (p.shape[0] * p.shape[1])


def _naive_indexer_kl_dense(q, k, q_idx, k_idx, weights, *, scale=None, cu_seqlens=None, block=None):
    """Reference for `indexer_kl_dense` via plain autograd over [B, T, T] tensors (tests only)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = _naive_visible(q.shape[1], cu_seqlens, q.device)[None].expand(q.shape[0], -1, -1)
    p = _naive_probs(q.detach(), k.detach(), allowed, scale, _compute_dtype(q_idx, k_idx, weights))
    return _naive_kl(p, q_idx, k_idx, weights, allowed)


def _naive_indexer_kl_sparse(q, k, q_idx, k_idx, weights, indices, *, scale=None, cu_seqlens=None,
                             attn_lse=None, block=None):
    """Reference for `indexer_kl_sparse` (attn_lse is ignored: the probabilities are computed exactly)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = _naive_selected(indices, cu_seqlens)
    p = _naive_probs(q.detach(), k.detach(), allowed, scale, _compute_dtype(q_idx, k_idx, weights))
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return _naive_kl(p, q_idx, k_idx, weights, allowed)


@torch.no_grad()
def _naive_attention_recall(q, k, indices, *, scale=None, cu_seqlens=None, block=None):
    """Reference for `attention_recall` over [B, T, T] tensors."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, T = q.shape[:2]
    visible = _naive_visible(T, cu_seqlens, q.device)[None].expand(B, -1, -1)
    p = _naive_probs(q, k, visible, scale, _compute_dtype(q))
    return (p * _naive_selected(indices, cu_seqlens)).sum() / (B * T)
