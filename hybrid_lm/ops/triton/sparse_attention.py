"""Triton kernels for index-sparse attention (the attention half of DeepSeek Sparse Attention, arXiv 2512.02556).

One program handles one query token and one key/value head: the ``G = HQ // HKV`` query heads that share that
head form the M dimension of every matrix product, so each gathered key/value row is read once for all of them
(V3.2's MQA trick; ``G`` is padded to 16, the smallest tensor-core tile). The forward runs an online softmax over
the token's ``K`` indices in blocks and saves the natural-log log-sum-exp. The backward recomputes the
probabilities from it, keeps dq in registers and scatters dk/dv into fp32 buffers with atomic adds (a gathered
row may be selected by many queries).

Shapes (fla's layout): q ``[B, Tq, HQ, D]``, k ``[B, Tk, HKV, D]``, v ``[B, Tk, HKV, DV]``, indices ``[B, Tq, K]``
(positions into k/v, or offsets within the query's document with ``cu_seqlens``; ``-1`` = empty), o
``[B, Tq, HQ, DV]``, lse ``[B, Tq, HQ]`` fp32. Index entries outside ``[0, Tk)`` are treated as empty.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _gather_rows(idx_ptr, k0, K, doc_start, Tk, BLOCK_K: tl.constexpr):
    """Absolute key positions [BLOCK_K] of one index block and their validity."""
    offs = k0 + tl.arange(0, BLOCK_K)
    idx = tl.load(idx_ptr + offs, mask=offs < K, other=-1).to(tl.int32)
    pos = idx + doc_start
    valid = (idx >= 0) & (pos < Tk)
    return tl.where(valid, pos, 0), valid


@triton.jit
def _index_extent(idx_ptr, NK, SCAN: tl.constexpr = 1024):
    """One past the last non-empty (>= 0) slot of a token's index row [NK]: the key loops stop there. Rows that see
    fewer keys than there are slots (the first topk tokens, the start of each document) are -1 padded at the end,
    and their padding then costs no gathers, products or atomics; any slot order stays correct."""
    extent = tl.full([], 0, tl.int32)
    for k0 in range(0, NK, SCAN):
        offs = k0 + tl.arange(0, SCAN)
        idx = tl.load(idx_ptr + offs, mask=offs < NK, other=-1)
        extent = tl.maximum(extent, tl.max(tl.where(idx >= 0, offs + 1, 0), 0))
    return extent


@triton.jit
def _sparse_fwd_kernel(
    Q, K_, V, IDX, DOC, O, LSE,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, si_b, si_t, so_b, so_t, so_h, sl_b, sl_t,
    HKV, Tk, NK, qk_scale,
    G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_DOC: tl.constexpr, V_IN_K: tl.constexpr, HAS_TAIL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1)
    b, hk = (bh // HKV).to(tl.int64), bh % HKV
    heads = hk * G + tl.arange(0, BLOCK_H)
    hmask = tl.arange(0, BLOCK_H) < G
    dq, dv, dt = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), BLOCK_D + tl.arange(0, BLOCK_DT)
    q_row = Q + b * sq_b + t * sq_t + heads[:, None] * sq_h
    q = tl.load(q_row + dq[None, :], mask=hmask[:, None] & (dq[None, :] < D), other=0.0)  # [BLOCK_H, BLOCK_D]
    q_tail = q
    if HAS_TAIL:  # head dims BLOCK_D .. D (e.g. MLA's rotary part), [BLOCK_H, BLOCK_DT]
        q_tail = tl.load(q_row + dt[None, :], mask=hmask[:, None] & (dt[None, :] < D), other=0.0)
    doc_start = 0
    if HAS_DOC:
        doc_start = tl.load(DOC + t)
    k_base = K_ + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    idx_ptr = IDX + b * si_b + t * si_t
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for k0 in range(0, _index_extent(idx_ptr, NK), BLOCK_K):
        pos, valid = _gather_rows(idx_ptr, k0, NK, doc_start, Tk, BLOCK_K)
        k_rows = k_base + pos.to(tl.int64)[:, None] * sk_t
        kt = tl.load(k_rows + dq[None, :], mask=valid[:, None] & (dq[None, :] < D), other=0.0)  # [BLOCK_K, BLOCK_D]
        s = tl.dot(q, tl.trans(kt))
        if HAS_TAIL:
            kt_tail = tl.load(k_rows + dt[None, :], mask=valid[:, None] & (dt[None, :] < D), other=0.0)
            s += tl.dot(q_tail, tl.trans(kt_tail))
        s = s * qk_scale  # [BLOCK_H, BLOCK_K], log2 domain
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a block with no valid key leaves m at -inf; shifting by 0 then keeps exp2 finite
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_IN_K:  # the values are the keys' first DV dims (MLA's latent): already loaded
            vt = kt
        else:
            vt = tl.load(v_base + pos.to(tl.int64)[:, None] * sv_t + dv[None, :],
                         mask=valid[:, None] & (dv[None, :] < DV), other=0.0)  # [BLOCK_K, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(O + b * so_b + t * so_t + heads[:, None] * so_h + dv[None, :], o.to(O.dtype.element_ty),
             mask=hmask[:, None] & (dv[None, :] < DV))
    tl.store(LSE + b * sl_b + t * sl_t + heads, lse, mask=hmask)


@triton.jit
def _sparse_bwd_kernel(
    Q, K_, V, IDX, DOC, DO, LSE, DELTA, DQ, DK, DV_,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, si_b, si_t, so_b, so_t, so_h, sl_b, sl_t,
    sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
    HKV, Tk, NK, scale,
    G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_DOC: tl.constexpr, V_IN_K: tl.constexpr, HAS_TAIL: tl.constexpr,
):
    """V_IN_K: v is a view of k's first DV dims; dv is then added into DK with dk (DV_ is not written)."""
    t = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1)
    b, hk = (bh // HKV).to(tl.int64), bh % HKV
    heads = hk * G + tl.arange(0, BLOCK_H)
    hmask = tl.arange(0, BLOCK_H) < G
    dq_r, dv_r, dt_r = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), BLOCK_D + tl.arange(0, BLOCK_DT)
    qmask = hmask[:, None] & (dq_r[None, :] < D)
    tmask = hmask[:, None] & (dt_r[None, :] < D)
    q_row = Q + b * sq_b + t * sq_t + heads[:, None] * sq_h
    q = tl.load(q_row + dq_r[None, :], mask=qmask, other=0.0)
    q_tail = q
    dq_tail = tl.zeros([BLOCK_H, BLOCK_DT], tl.float32)
    if HAS_TAIL:
        q_tail = tl.load(q_row + dt_r[None, :], mask=tmask, other=0.0)
    do = tl.load(DO + b * so_b + t * so_t + heads[:, None] * so_h + dv_r[None, :],
                 mask=hmask[:, None] & (dv_r[None, :] < DV), other=0.0)  # [BLOCK_H, BLOCK_DV]
    lse2 = tl.load(LSE + b * sl_b + t * sl_t + heads, mask=hmask, other=0.0) * LOG2E
    delta = tl.load(DELTA + b * sl_b + t * sl_t + heads, mask=hmask, other=0.0)
    doc_start = 0
    if HAS_DOC:
        doc_start = tl.load(DOC + t)
    k_base = K_ + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    dk_base = DK + b * sdk_b + hk * sdk_h
    dv_base = DV_ + b * sdv_b + hk * sdv_h
    idx_ptr = IDX + b * si_b + t * si_t
    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for k0 in range(0, _index_extent(idx_ptr, NK), BLOCK_K):
        pos, valid = _gather_rows(idx_ptr, k0, NK, doc_start, Tk, BLOCK_K)
        rows = pos.to(tl.int64)[:, None]
        kmask = valid[:, None] & (dq_r[None, :] < D)
        vmask = valid[:, None] & (dv_r[None, :] < DV)
        kt = tl.load(k_base + rows * sk_t + dq_r[None, :], mask=kmask, other=0.0)  # [BLOCK_K, BLOCK_D]
        if V_IN_K:
            vt = kt
        else:
            vt = tl.load(v_base + rows * sv_t + dv_r[None, :], mask=vmask, other=0.0)  # [BLOCK_K, BLOCK_DV]
        s = tl.dot(q, tl.trans(kt))
        kt_tail = kt
        if HAS_TAIL:
            kt_tail = tl.load(k_base + rows * sk_t + dt_r[None, :], mask=valid[:, None] & (dt_r[None, :] < D),
                              other=0.0)
            s += tl.dot(q_tail, tl.trans(kt_tail))
        s = s * (scale * LOG2E)
        p = tl.where(valid[None, :] & hmask[:, None], tl.exp2(s - lse2[:, None]), 0.0)  # [BLOCK_H, BLOCK_K]
        dp = tl.dot(do, tl.trans(vt))
        ds = p * (dp - delta[:, None])  # d loss / d (scaled logit)
        dq += tl.dot(ds.to(kt.dtype), kt)
        dv_blk = tl.dot(tl.trans(p.to(do.dtype)), do)  # [BLOCK_K, BLOCK_DV]
        dk_blk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale  # [BLOCK_K, BLOCK_D]
        if V_IN_K:  # one scatter for the shared rows
            tl.atomic_add(dk_base + rows * sdk_t + dq_r[None, :], dk_blk + dv_blk, mask=kmask, sem="relaxed")
        else:
            tl.atomic_add(dv_base + rows * sdv_t + dv_r[None, :], dv_blk, mask=vmask, sem="relaxed")
            tl.atomic_add(dk_base + rows * sdk_t + dq_r[None, :], dk_blk, mask=kmask, sem="relaxed")
        if HAS_TAIL:
            dq_tail += tl.dot(ds.to(kt.dtype), kt_tail)
            dk_tail = tl.dot(tl.trans(ds.to(q.dtype)), q_tail) * scale  # [BLOCK_K, BLOCK_DT]
            tl.atomic_add(dk_base + rows * sdk_t + dt_r[None, :], dk_tail,
                          mask=valid[:, None] & (dt_r[None, :] < D), sem="relaxed")
    dq_row = DQ + b * sq_b + t * sq_t + heads[:, None] * sq_h
    tl.store(dq_row + dq_r[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qmask)
    if HAS_TAIL:
        tl.store(dq_row + dt_r[None, :], (dq_tail * scale).to(DQ.dtype.element_ty), mask=tmask)


def split_head_dim(D: int, split: bool = True) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DT): q/k head dims as a power-of-2 main part plus a power-of-2 tail (0: none) where that is
    narrower than one padded block: MLA's 288 = 256 + 32 and 576 = 512 + 64 instead of 512 and 1024. `split`
    False: always the one padded block."""
    full = max(16, triton.next_power_of_2(D))
    main = full // 2
    if split and main >= 16 and D > main:
        tail = max(16, triton.next_power_of_2(D - main))
        if main + tail < full:
            return main, tail
    return full, 0


# True: head dims split into a power-of-2 block + tail, and values that are a view of the keys' first dims (MLA)
# gathered once; False: one padded block, values gathered separately (bench_sparse_attention.py --mla compares them).
# On an H100 (2026-12-06, run 11) the split kernels matched the reference for 96, 288 and 576 and were 1.62-1.65x
# (12 heads, 288 / 256) and 2.81-3.16x (16 heads, 576 / 512) faster fwd+bwd than the padded ones at 16k and 64k.
SPLIT_HEAD_DIM = True


def _config(G: int, D: int, DV: int, block_k: int, v_in_k: bool = False) -> dict:
    block_h = max(16, triton.next_power_of_2(G))
    block_d, block_dt = split_head_dim(D, SPLIT_HEAD_DIM)
    block_dv = max(16, triton.next_power_of_2(DV))
    # wider heads (MLA's 576) shrink the key block so the gathered tiles still fit in registers
    block_k = max(16, block_k * 128 // max(128, triton.next_power_of_2(block_d + block_dt), block_dv))
    return dict(G=G, BLOCK_H=block_h, D=D, DV=DV, BLOCK_D=block_d, BLOCK_DT=max(16, block_dt), HAS_TAIL=block_dt > 0,
                BLOCK_DV=block_dv, BLOCK_K=block_k, V_IN_K=v_in_k)


def values_in_keys(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether v is a view of k's first DV head dims (MLA's absorbed form: the values are the latent, the keys the
    latent plus the rotary part) with DV a power of 2 equal to the keys' main block: the kernels then gather each
    row once and scatter one gradient."""
    if not SPLIT_HEAD_DIM:
        return False
    DV = v.shape[-1]
    # the same autograd storage (not a detached alias): v's gradient may then be added into k's
    same_base = v._base is not None and (v._base is k or v._base is k._base)
    return (same_base and v.data_ptr() == k.data_ptr() and v.stride() == k.stride() and v.shape[:3] == k.shape[:3]
            and v.dtype == k.dtype and split_head_dim(k.shape[-1])[0] == DV == triton.next_power_of_2(DV)
            and DV < k.shape[-1])


# (BLOCK_K, num_warps, num_stages) at 16 heads x 128. Sweeps on an H100 (BENCHMARKS.md): the forward's configs are
# within 5% of each other; the backward's (32, 4, 1) took 58.7 ms at T = 65,536 with one KV head against 64.5 ms
# for (16, 4, 1) and 68.2 for (32, 8, 2), and 228 against 255 and 237 ms with 4 KV heads (run 12, 2026-12-06).
# Compiled as the JIT specialises it (16-byte-aligned strides), tl.atomic_add scatters dk / dv as 16-byte
# `atom.global.add.v4.f32` (156 registers, no spills at 16 x 128 with triton 3.6). Splitting the backward into two
# sweeps (dv, then dq + dk) so each fp32 atomic target fits in L2 gained nothing measurable, and 8-byte
# `red.global.add.v2.f32` pairs through inline PTX were 9x slower (run 12), so the backward keeps tl.atomic_add.
FWD_CONFIG = (64, 8, 2)
BWD_CONFIG = (32, 4, 1)
# Head dims <= 64 (the 350M hybrid's 16 x 64, one KV head), run 18 at T = 32,768 (H100, 2026-12-06): the forward's
# (32, 4, 2) took 3.58 ms against 4.03 for (64, 8, 2), the backward's (32, 4, 2) 11.50 ms against 14.60 for (32, 4, 1)
# (two stages fit there; at 16 x 128 the backward runs one). Timed with one KV head; GQA at these dims uses the same
# 16-row tiles but has not been timed.
NARROW_FWD_CONFIG = (32, 4, 2)
NARROW_BWD_CONFIG = (32, 4, 2)


def default_config(D: int, DV: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_K, num_warps, num_stages) the launches use unless given one: by pass and by the widest head dim."""
    if max(D, DV) <= 64:
        return NARROW_BWD_CONFIG if backward else NARROW_FWD_CONFIG
    return BWD_CONFIG if backward else FWD_CONFIG


def _doc_starts(cu_seqlens: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
    """Start position [T] (int32) of each token's document, computed on device (no host sync)."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    t = torch.arange(T, device=device)
    doc = torch.searchsorted(cu[1:], t, right=True).clamp_(max=cu.numel() - 2)
    return cu[doc].to(torch.int32)


def _strides3(x):
    return x.stride(0), x.stride(1), x.stride(2)


def sparse_attention_fwd(q, k, v, indices, doc, scale, config=None, v_in_k=None):
    """Forward kernel launch: returns o [B, Tq, HQ, DV] (q's dtype) and lse [B, Tq, HQ] fp32."""
    B, Tq, HQ, D = q.shape
    Tk, HKV, DV = k.shape[1], k.shape[2], v.shape[3]
    NK = indices.shape[2]
    o = torch.empty(B, Tq, HQ, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Tq, HQ, device=q.device, dtype=torch.float32)
    if B * Tq == 0:
        return o, lse
    block_k, num_warps, num_stages = config or default_config(D, DV, backward=False)
    v_in_k = values_in_keys(k, v) if v_in_k is None else v_in_k
    cfg = _config(HQ // HKV, D, DV, block_k, v_in_k)
    grid = (Tq, B * HKV)
    _sparse_fwd_kernel[grid](
        q, k, v, indices, doc if doc is not None else indices, o, lse,
        *_strides3(q), *_strides3(k), *_strides3(v), indices.stride(0), indices.stride(1), *_strides3(o),
        lse.stride(0), lse.stride(1),
        HKV, Tk, NK, scale * 1.4426950408889634, HAS_DOC=doc is not None, num_warps=num_warps, num_stages=num_stages,
        **cfg,
    )
    return o, lse


def sparse_attention_bwd(q, k, v, indices, doc, o, lse, do, dlse, scale, config=None, v_in_k=None):
    """Backward kernel launch: returns dq, dk, dv in the dtypes of q, k, v (dv None when v is a view of k's first
    dims: its gradient is then part of dk)."""
    B, Tq, HQ, D = q.shape
    Tk, HKV, DV = k.shape[1], k.shape[2], v.shape[3]
    NK = indices.shape[2]
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)  # [B, Tq, HQ]
    if dlse is not None:
        # lse depends on the logits through softmax too: its gradient folds into delta
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq = torch.empty_like(q)
    v_in_k = values_in_keys(k, v) if v_in_k is None else v_in_k
    dk = torch.zeros(B, Tk, HKV, D, device=q.device, dtype=torch.float32)
    dv = dk if v_in_k else torch.zeros(B, Tk, HKV, DV, device=q.device, dtype=torch.float32)
    if B * Tq > 0:
        block_k, num_warps, num_stages = config or default_config(D, DV, backward=True)
        cfg = _config(HQ // HKV, D, DV, block_k, v_in_k)
        _sparse_bwd_kernel[(Tq, B * HKV)](
            q, k, v, indices, doc if doc is not None else indices, do, lse, delta, dq, dk, dv,
            *_strides3(q), *_strides3(k), *_strides3(v), indices.stride(0), indices.stride(1), *_strides3(do),
            lse.stride(0), lse.stride(1), *_strides3(dk), *_strides3(dv),
            HKV, Tk, NK, scale, HAS_DOC=doc is not None, num_warps=num_warps, num_stages=num_stages, **cfg,
        )
    if v_in_k:  # dk holds both gradients of the shared storage; v's is already in it
        return dq, dk.to(k.dtype), None
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class SparseAttentionFunction(torch.autograd.Function):
    """o, lse = sparse attention of q over the indexed rows of k, v; differentiable in q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, indices, doc, scale):
        ctx.v_in_k = values_in_keys(k, v)  # decided here: saved tensors lose their view relation
        o, lse = sparse_attention_fwd(q, k, v, indices, doc, scale, v_in_k=ctx.v_in_k)
        ctx.save_for_backward(q, k, v, indices, doc, o, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(indices)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, indices, doc, o, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd(q, k, v, indices, doc, o, lse, do, dlse, ctx.scale, v_in_k=ctx.v_in_k)
        return dq, dk, dv, None, None, None


def sparse_attention_triton(q, k, v, indices, *, scale, cu_seqlens=None, return_lse=False):
    """Backend entry point with the op's signature (minus ``backend``); returns ``(o, lse)``."""
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"sparse_attention[triton]: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    indices = indices.to(torch.int32).contiguous()
    doc = _doc_starts(cu_seqlens, q.shape[1], q.device)
    o, lse = SparseAttentionFunction.apply(q, k, v, indices, doc, float(scale))
    return o, lse
