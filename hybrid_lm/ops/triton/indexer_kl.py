"""Triton kernels for the lightning indexer's KL losses (DeepSeek-V3.2, arXiv 2512.02556, section 2).

Both stages compare the main attention's head-averaged distribution ``p[t, :]`` with ``softmax(I[t, :])``, the
indexer's logits ``I[t, s] = sum_j w[t, j] * relu(q_idx[t, j] . k_idx[s])`` (semantics, shapes and the pure-PyTorch
reference: ``hybrid_lm/ops/dsa_loss.py``). Per query token the loss is accumulated in one streaming pass over its
keys, never writing a [T, T] (or [T, K] for the sparse stage) tensor:

    KL_t = sum_s p_s log p_s - sum_s p_s I_s + logsumexp_s(I_s)            (sum_s p_s = 1)

with an online log-sum-exp for ``I``. The forward saves only ``logsumexp(I)`` (and, for the sparse stage, the mass
``Z`` used to renormalise ``p``) per token; the backward recomputes ``p`` and ``I`` block by block (flash-attention
style) and applies ``dKL/dI = softmax(I) - p`` through the relu: dq_idx and dw stay in registers, dk_idx is
scattered with fp32 atomic adds (a key is seen by many queries).

- Sparse stage (``indexer_kl_sparse``): one program per query token. ``p`` comes from the sparse attention's saved
  log-sum-exp: ``p_s = sum_h exp(scale q_h.k_s - lse_h) / Z`` over the selected keys, all query heads of every KV
  head, so each gathered key row serves all heads that share it. With ``SPARSE_ONE_SWEEP`` (the default) a forward that
  needs gradients sweeps the indexer logits alone for their log-sum-exp, then computes loss and gradients in one
  sweep; the backward only scales them.
- Dense warm-up (``indexer_kl_dense``): one program per block of ``BLOCK_M`` queries, a flash-attention-like sweep
  over the causal keys (within the query's document with packed sequences). The per-head log-sum-exp comes from a
  first sweep (``_dense_lse_kernel``, the scores only, no values); ``p_s = sum_h exp(scale q_h.k_s - lse_h) / HQ``.
  The rows of a query block and a KV group's heads are stacked into one ``[BLOCK_M * G, D]`` operand.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_attention import _doc_starts, _index_extent

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------------------------------------------
# sparse stage


@triton.jit
def _sparse_keys(idx_ptr, k0, NK, doc_start, t, BLOCK_K: tl.constexpr):
    """Absolute positions [BLOCK_K] of one block of a query's selected keys, and their validity (-1 pads, keys
    after the query are ignored, as in the reference)."""
    offs = k0 + tl.arange(0, BLOCK_K)
    idx = tl.load(idx_ptr + offs, mask=offs < NK, other=-1).to(tl.int32)
    pos = idx + doc_start
    valid = (idx >= 0) & (pos <= t)
    return tl.where(valid, pos, 0).to(tl.int64), valid


@triton.jit
def _sparse_target(q_ptr, k_ptr, lse_ptr, pos, valid, sq_h, sk_t, sk_h, HKV, qk_scale,
                   G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """Unnormalised head-summed attention probabilities [BLOCK_K] of one query over a block of its keys."""
    g = tl.arange(0, BLOCK_H)
    dd = tl.arange(0, BLOCK_D)
    hmask = g < G
    p = tl.zeros([BLOCK_K], tl.float32)
    for hk in range(HKV):
        heads = hk * G + g
        q = tl.load(q_ptr + heads[:, None] * sq_h + dd[None, :], mask=hmask[:, None] & (dd[None, :] < D), other=0.0)
        lse2 = tl.load(lse_ptr + heads, mask=hmask, other=0.0) * LOG2E
        kt = tl.load(k_ptr + hk * sk_h + pos[:, None] * sk_t + dd[None, :],
                     mask=valid[:, None] & (dd[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale  # [BLOCK_H, BLOCK_K], log2 domain
        e = tl.where(hmask[:, None] & valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        p += tl.sum(e, 0)
    return p


@triton.jit
def _xlogx(p):
    """p log p, 0 where p is 0 (a key the target gives no mass)."""
    return tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)


@triton.jit
def _sparse_kl(sum_p_logp, sum_p_logit, z, lse_i):
    """KL(p/Z || softmax(I)) = sum (p/Z) log(p/Z) - sum (p/Z) I + logsumexp(I) from the sums over the selected
    keys; a row without keys (z = 0) contributes 0."""
    has = z > 0
    z_safe = tl.where(has, z, 1.0)
    return tl.where(has, sum_p_logp / z_safe - tl.log(z_safe) - sum_p_logit / z_safe + lse_i, 0.0)


@triton.jit
def _sparse_logits(qi, ki_ptr, w, pos, valid, ski_t, DI: tl.constexpr, BLOCK_DI: tl.constexpr, PREC: tl.constexpr):
    """Indexer logits [BLOCK_K] (-inf where invalid), the pre-relu dots [BLOCK_HI, BLOCK_K] and the key rows."""
    di = tl.arange(0, BLOCK_DI)
    ki = tl.load(ki_ptr + pos[:, None] * ski_t + di[None, :], mask=valid[:, None] & (di[None, :] < DI), other=0.0)
    a = tl.dot(qi, tl.trans(ki), input_precision=PREC)  # [BLOCK_HI, BLOCK_K]
    logits = tl.sum(w[:, None] * tl.maximum(a, 0.0), 0)
    return tl.where(valid, logits, float("-inf")), a, ki


# passes of the sparse kernel: LOSS and GRADS are the two sweeps of the forward and the backward; LOGITS (the indexer
# logits' log-sum-exp only) then ONE_SWEEP (loss and unscaled gradients together) replace them when gradients are
# wanted and SPARSE_ONE_SWEEP is on
LOSS: tl.constexpr = tl.constexpr(0)
GRADS: tl.constexpr = tl.constexpr(1)
LOGITS: tl.constexpr = tl.constexpr(2)
ONE_SWEEP: tl.constexpr = tl.constexpr(3)


@triton.jit
def _kl_sparse_kernel(
    Q, K_, LSE, QI, KI, W, IDX, DOC, KL, LSEI, Z, DQI, DKI, DW, GRAD,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sl_b, sl_t, sqi_b, sqi_t, sqi_h, ski_b, ski_t, sw_b, sw_t, si_b, si_t,
    T, NK, HKV, HI, qk_scale,
    G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr,
    DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_K: tl.constexpr, HAS_DOC: tl.constexpr,
    PASS: tl.constexpr, PREC: tl.constexpr,
):
    """PASS LOSS: KL, LSEI (the indexer logits' log-sum-exp) and Z (the target's mass) per token. GRADS: dq_idx, dw
    and the dk_idx scatter, scaled by GRAD, from LSEI and Z. LOGITS: LSEI, and Z as the number of query heads
    (attn_lse is the attention's log-sum-exp over the same selected keys: each head's probabilities sum to 1),
    without the attention target. ONE_SWEEP: after LOGITS, KL and the unscaled gradients in one sweep."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    row = b * T + t  # index into the [B, T] per-token buffers
    doc_start = 0
    if HAS_DOC:
        doc_start = tl.load(DOC + t)
    q_ptr = Q + b * sq_b + t * sq_t
    k_ptr = K_ + b * sk_b
    lse_ptr = LSE + b * sl_b + t * sl_t
    ki_ptr = KI + b * ski_b
    idx_ptr = IDX + b * si_b + t * si_t
    j = tl.arange(0, BLOCK_HI)
    di = tl.arange(0, BLOCK_DI)
    jmask = j < HI
    qi_mask = jmask[:, None] & (di[None, :] < DI)
    qi = tl.load(QI + b * sqi_b + t * sqi_t + j[:, None] * sqi_h + di[None, :], mask=qi_mask, other=0.0)
    w = tl.load(W + b * sw_b + t * sw_t + j, mask=jmask, other=0.0).to(tl.float32)
    if PASS == LOSS or PASS == LOGITS:
        # lane-wise accumulators over the key blocks, reduced once at the end
        m_v = tl.full([BLOCK_K], float("-inf"), tl.float32)
        l_v = tl.zeros([BLOCK_K], tl.float32)
        z_v = tl.zeros([BLOCK_K], tl.float32)
        p_logp = tl.zeros([BLOCK_K], tl.float32)
        p_logit = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, _index_extent(idx_ptr, NK), BLOCK_K):
            pos, valid = _sparse_keys(idx_ptr, k0, NK, doc_start, t, BLOCK_K)
            logits, _, _ = _sparse_logits(qi, ki_ptr, w, pos, valid, ski_t, DI, BLOCK_DI, PREC)
            m_new = tl.maximum(m_v, logits)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_v = l_v * tl.exp(m_v - m_safe) + tl.exp(logits - m_safe)
            m_v = m_new
            if PASS == LOSS:
                p = _sparse_target(q_ptr, k_ptr, lse_ptr, pos, valid, sq_h, sk_t, sk_h, HKV, qk_scale,
                                   G, BLOCK_H, D, BLOCK_D, BLOCK_K, PREC)
                z_v += p
                p_logp += _xlogx(p)
                p_logit += tl.where(valid, p * logits, 0.0)
            else:
                z_v += valid.to(tl.float32)  # keys seen; Z follows from them below
        m_i = tl.max(m_v, 0)
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        l_i = tl.sum(tl.where(m_v == float("-inf"), 0.0, l_v * tl.exp(m_v - m_safe)), 0)
        z = tl.sum(z_v, 0)
        if PASS == LOGITS:
            z = tl.where(z > 0, G * HKV * 1.0, 0.0)
        has = z > 0
        lse_i = m_safe + tl.log(tl.where(l_i > 0, l_i, 1.0))
        if PASS == LOSS:
            tl.store(KL + row, _sparse_kl(tl.sum(p_logp, 0), tl.sum(p_logit, 0), z, lse_i))
        tl.store(LSEI + row, tl.where(has, lse_i, 0.0))
        tl.store(Z + row, z)
    else:
        z = tl.load(Z + row)
        lse_i = tl.load(LSEI + row)
        gscale = 1.0
        if PASS == GRADS:
            gscale = tl.load(GRAD)
        inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)
        dqi = tl.zeros([BLOCK_HI, BLOCK_DI], tl.float32)
        dw = tl.zeros([BLOCK_HI], tl.float32)
        p_logp = tl.zeros([BLOCK_K], tl.float32)
        p_logit = tl.zeros([BLOCK_K], tl.float32)
        dki_ptr = DKI + b * T * DI
        for k0 in range(0, _index_extent(idx_ptr, NK), BLOCK_K):
            pos, valid = _sparse_keys(idx_ptr, k0, NK, doc_start, t, BLOCK_K)
            p = _sparse_target(q_ptr, k_ptr, lse_ptr, pos, valid, sq_h, sk_t, sk_h, HKV, qk_scale,
                               G, BLOCK_H, D, BLOCK_D, BLOCK_K, PREC)
            logits, a, ki = _sparse_logits(qi, ki_ptr, w, pos, valid, ski_t, DI, BLOCK_DI, PREC)
            if PASS == ONE_SWEEP:
                p_logp += _xlogx(p)
                p_logit += tl.where(valid, p * logits, 0.0)
            d_logit = tl.where(valid, (tl.exp(logits - lse_i) - p * inv_z) * gscale, 0.0)  # [BLOCK_K]
            dw += tl.sum(d_logit[None, :] * tl.maximum(a, 0.0), 1)
            da = tl.where(a > 0, d_logit[None, :] * w[:, None], 0.0)  # [BLOCK_HI, BLOCK_K]
            dqi += tl.dot(da.to(ki.dtype), ki, input_precision=PREC)
            dki = tl.dot(tl.trans(da.to(qi.dtype)), qi, input_precision=PREC)  # [BLOCK_K, BLOCK_DI]
            tl.atomic_add(dki_ptr + pos[:, None] * DI + di[None, :], dki,
                          mask=valid[:, None] & (di[None, :] < DI), sem="relaxed")
        tl.store(DQI + row * HI * DI + j[:, None] * DI + di[None, :], dqi, mask=qi_mask)
        tl.store(DW + row * HI + j, dw, mask=jmask)
        if PASS == ONE_SWEEP:
            tl.store(KL + row, _sparse_kl(tl.sum(p_logp, 0), tl.sum(p_logit, 0), z, lse_i))


# ----------------------------------------------------------------------------------------------------------------
# dense warm-up


@triton.jit
def _dense_rows(t0, T, DOC, HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query positions [BLOCK_M], their validity and their documents' first positions."""
    t = t0 + tl.arange(0, BLOCK_M)
    tmask = t < T
    start = tl.zeros([BLOCK_M], tl.int32)
    if HAS_DOC:
        start = tl.load(DOC + t, mask=tmask, other=0)
    return t, tmask, start


@triton.jit
def _dense_group_q(q_ptr, t0, T, hk, sq_t, sq_h, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """The queries of one KV group stacked as [BLOCK_M * BLOCK_G, BLOCK_D] rows (row = m * BLOCK_G + g), with
    each row's position, head and validity."""
    r = tl.arange(0, BLOCK_M * BLOCK_G)
    rt = t0 + r // BLOCK_G
    g = r % BLOCK_G
    rmask = (g < G) & (rt < T)
    dd = tl.arange(0, BLOCK_D)
    heads = hk * G + g
    q = tl.load(q_ptr + rt.to(tl.int64)[:, None] * sq_t + heads[:, None] * sq_h + dd[None, :],
                mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    return q, rt, heads, rmask


@triton.jit
def _index_rows(t0, T, HI, BLOCK_M: tl.constexpr, BLOCK_HI: tl.constexpr):
    """Rows (m, j) of the stacked index queries [BLOCK_M * BLOCK_HI, DI]: each row's position, head, validity."""
    r = tl.arange(0, BLOCK_M * BLOCK_HI)
    ti, ji = t0 + r // BLOCK_HI, r % BLOCK_HI
    return ti, ji, (ji < HI) & (ti < T)


@triton.jit
def _dense_lse_kernel(
    Q, K_, DOC, LSE, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sl_b, sl_t, T, HKV, qk_scale,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
):
    """Per-head natural-log log-sum-exp of the scaled causal logits (a flash-attention forward without values)."""
    t0 = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    q, rt, heads, rmask = _dense_group_q(Q + b * sq_b, t0, T, hk, sq_t, sq_h, G, BLOCK_G, D, BLOCK_D, BLOCK_M)
    rstart = tl.zeros([BLOCK_M * BLOCK_G], tl.int32)
    if HAS_DOC:
        rstart = tl.load(DOC + rt, mask=rmask, other=0)
    dd = tl.arange(0, BLOCK_D)
    k_lo = 0  # document starts never decrease, so the block's first query has the earliest
    if HAS_DOC:
        k_lo = tl.load(DOC + t0)
    k_hi = tl.minimum(t0 + BLOCK_M, T)
    m_i = tl.full([BLOCK_M * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * BLOCK_G], tl.float32)
    for n0 in range((k_lo // BLOCK_N) * BLOCK_N, k_hi, BLOCK_N):
        s_pos = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(K_ + b * sk_b + hk * sk_h + s_pos.to(tl.int64)[:, None] * sk_t + dd[None, :],
                     mask=(s_pos[:, None] < T) & (dd[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        vis = (s_pos[None, :] <= rt[:, None]) & (s_pos[None, :] >= rstart[:, None]) & rmask[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) / LOG2E
    tl.store(LSE + b * sl_b + rt.to(tl.int64) * sl_t + heads, lse, mask=rmask)


@triton.jit
def _dense_block(Q, K_, LSE, QI, KI, W, b, t0, t, tmask, start, n0, T, HKV, HQ, HI, qk_scale,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sl_b, sl_t, sqi_b, sqi_t, sqi_h, ski_b, ski_t, sw_b, sw_t,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_HI: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile: the target p, the indexer logits (-inf where not visible), the visibility,
    the pre-relu dots [BLOCK_M * BLOCK_HI, BLOCK_N], the stacked index queries (rows as in _index_rows), their
    weights and the key rows."""
    s_pos = n0 + tl.arange(0, BLOCK_N)
    vis = (s_pos[None, :] <= t[:, None]) & (s_pos[None, :] >= start[:, None]) & tmask[:, None]  # [BLOCK_M, BLOCK_N]
    dd = tl.arange(0, BLOCK_D)
    p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for hk in range(HKV):
        q, rt, heads, rmask = _dense_group_q(Q + b * sq_b, t0, T, hk, sq_t, sq_h, G, BLOCK_G, D, BLOCK_D, BLOCK_M)
        lse2 = tl.load(LSE + b * sl_b + rt.to(tl.int64) * sl_t + heads, mask=rmask, other=0.0) * LOG2E
        kt = tl.load(K_ + b * sk_b + hk * sk_h + s_pos.to(tl.int64)[:, None] * sk_t + dd[None, :],
                     mask=(s_pos[:, None] < T) & (dd[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        e = tl.where(rmask[:, None], tl.exp2(s - lse2[:, None]), 0.0)  # [BLOCK_M * BLOCK_G, BLOCK_N]
        p += tl.sum(tl.reshape(e, [BLOCK_M, BLOCK_G, BLOCK_N]), 1)
    p = tl.where(vis, p / HQ, 0.0)
    # indexer: rows (m, j) stacked as [BLOCK_M * BLOCK_HI, BLOCK_DI]
    ti, ji, imask = _index_rows(t0, T, HI, BLOCK_M, BLOCK_HI)
    di = tl.arange(0, BLOCK_DI)
    qi = tl.load(QI + b * sqi_b + ti.to(tl.int64)[:, None] * sqi_t + ji[:, None] * sqi_h + di[None, :],
                 mask=imask[:, None] & (di[None, :] < DI), other=0.0)
    w = tl.load(W + b * sw_b + ti.to(tl.int64) * sw_t + ji, mask=imask, other=0.0).to(tl.float32)
    ki = tl.load(KI + b * ski_b + s_pos.to(tl.int64)[:, None] * ski_t + di[None, :],
                 mask=(s_pos[:, None] < T) & (di[None, :] < DI), other=0.0)
    a = tl.dot(qi, tl.trans(ki), input_precision=PREC)  # [BLOCK_M * BLOCK_HI, BLOCK_N]
    logits = tl.sum(tl.reshape(w[:, None] * tl.maximum(a, 0.0), [BLOCK_M, BLOCK_HI, BLOCK_N]), 1)
    logits = tl.where(vis, logits, float("-inf"))
    return p, logits, vis, a, qi, w, ki


@triton.jit
def _kl_dense_kernel(
    Q, K_, LSE, QI, KI, W, DOC, KL, LSEI, DQI, DKI, DW, GRAD,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sl_b, sl_t, sqi_b, sqi_t, sqi_h, ski_b, ski_t, sw_b, sw_t,
    T, HKV, HQ, HI, qk_scale,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr,
    DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DOC: tl.constexpr, BACKWARD: tl.constexpr, PREC: tl.constexpr,
):
    t0 = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1).to(tl.int64)
    t, tmask, start = _dense_rows(t0, T, DOC, HAS_DOC, BLOCK_M)
    k_lo = 0  # document starts never decrease, so the block's first query has the earliest
    if HAS_DOC:
        k_lo = tl.load(DOC + t0)
    k_hi = tl.minimum(t0 + BLOCK_M, T)
    rows = b * T + t
    if not BACKWARD:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        p_logp = tl.zeros([BLOCK_M], tl.float32)
        p_logit = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range((k_lo // BLOCK_N) * BLOCK_N, k_hi, BLOCK_N):
            p, logits, vis, _, _, _, _ = _dense_block(
                Q, K_, LSE, QI, KI, W, b, t0, t, tmask, start, n0, T, HKV, HQ, HI, qk_scale,
                sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sl_b, sl_t, sqi_b, sqi_t, sqi_h, ski_b, ski_t, sw_b, sw_t,
                G, BLOCK_G, D, BLOCK_D, BLOCK_HI, DI, BLOCK_DI, BLOCK_M, BLOCK_N, PREC)
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), 1)
            m_i = m_new
            p_logp += tl.sum(_xlogx(p), 1)
            p_logit += tl.sum(tl.where(vis, p * logits, 0.0), 1)
        lse_i = m_i + tl.log(tl.where(l_i > 0, l_i, 1.0))
        tl.store(KL + rows, p_logp - p_logit + lse_i, mask=tmask)
        tl.store(LSEI + rows, lse_i, mask=tmask)
    else:
        gscale = tl.load(GRAD)
        lse_i = tl.load(LSEI + rows, mask=tmask, other=0.0)
        dqi = tl.zeros([BLOCK_M * BLOCK_HI, BLOCK_DI], tl.float32)
        dw = tl.zeros([BLOCK_M * BLOCK_HI], tl.float32)
        di = tl.arange(0, BLOCK_DI)
        for n0 in range((k_lo // BLOCK_N) * BLOCK_N, k_hi, BLOCK_N):
            p, logits, vis, a, qi, w, ki = _dense_block(
                Q, K_, LSE, QI, KI, W, b, t0, t, tmask, start, n0, T, HKV, HQ, HI, qk_scale,
                sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sl_b, sl_t, sqi_b, sqi_t, sqi_h, ski_b, ski_t, sw_b, sw_t,
                G, BLOCK_G, D, BLOCK_D, BLOCK_HI, DI, BLOCK_DI, BLOCK_M, BLOCK_N, PREC)
            d_logit = tl.where(vis, (tl.exp(logits - lse_i[:, None]) - p) * gscale, 0.0)  # [BLOCK_M, BLOCK_N]
            # broadcast each query's row to its BLOCK_HI stacked index-head rows
            d_rows = tl.reshape(tl.broadcast_to(d_logit[:, None, :], [BLOCK_M, BLOCK_HI, BLOCK_N]),
                                [BLOCK_M * BLOCK_HI, BLOCK_N])
            dw += tl.sum(d_rows * tl.maximum(a, 0.0), 1)
            da = tl.where(a > 0, d_rows * w[:, None], 0.0)
            dqi += tl.dot(da.to(ki.dtype), ki, input_precision=PREC)
            dki = tl.dot(tl.trans(da.to(qi.dtype)), qi, input_precision=PREC)  # [BLOCK_N, BLOCK_DI]
            s_pos = n0 + tl.arange(0, BLOCK_N)
            tl.atomic_add(DKI + (b * T + s_pos.to(tl.int64))[:, None] * DI + di[None, :], dki,
                          mask=(s_pos[:, None] < T) & (di[None, :] < DI), sem="relaxed")
        ti, ji, omask = _index_rows(t0, T, HI, BLOCK_M, BLOCK_HI)
        out = (b * T + ti.to(tl.int64)) * HI + ji
        tl.store(DQI + out[:, None] * DI + di[None, :], dqi, mask=omask[:, None] & (di[None, :] < DI))
        tl.store(DW + out, dw, mask=omask)


# ----------------------------------------------------------------------------------------------------------------
# launchers


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _precision(*tensors) -> str:
    # fp32 inputs keep fp32 products (tests compare tightly); half inputs use the tensor cores as usual
    return "ieee" if any(x.dtype == torch.float32 for x in tensors) else "tf32"


def _strides(x, n=3):
    return tuple(x.stride(i) for i in range(n))


def _grad_buffers(B, T, HI, DI, device):
    """fp32 dq_idx [B, T, HI, DI], dk_idx [B, T, DI] (zeroed: atomic adds land there) and dw [B, T, HI]."""
    f32 = dict(device=device, dtype=torch.float32)
    return torch.empty(B, T, HI, DI, **f32), torch.zeros(B, T, DI, **f32), torch.empty(B, T, HI, **f32)


SPARSE_CONFIG = (32, 4)  # BLOCK_K, num_warps
DENSE_CONFIG = (64, 4)  # BLOCK_N, num_warps; BLOCK_M so that BLOCK_M * BLOCK_G ~ 64 rows
# The sparse stage's loss and gradients when gradients are wanted: True computes them in the forward, in one sweep
# that recomputes the attention target once (after a sweep over the indexer logits alone, whose log-sum-exp the
# gradient needs first), and the backward only scales them; False sweeps twice, recomputing the target in the
# forward (loss) and the backward (gradients). One sweep takes the target's mass Z as the number of query heads,
# which attn_lse's contract (the attention's log-sum-exp over the same selected keys) makes exact; two sweeps sum
# it. Run 18 (H100, 2026-12-06, 16 heads x 128, topk 2048): forward + backward 6.51 ms against 7.76 at T = 16,384
# and 27.29 against 31.74 at 65,536; a forward without gradients (no_grad, or no indexer input requiring grad)
# always takes the single loss sweep (2.45 and 10.0 ms there). Under activation checkpointing a block's forward
# runs twice, so one sweep would cost two gradient sweeps where two sweeps cost two loss sweeps and one gradient
# sweep (by run 18's times 27-31% more for the KL alone): a forward the caller marks `forward_recomputed` (the
# model does for its checkpointed blocks) takes two sweeps.
SPARSE_ONE_SWEEP = True


def _sparse_launch(q, k, lse, q_idx, k_idx, w, indices, doc, scale, pass_, saved=None, grad=None):
    """One pass of _kl_sparse_kernel: LOSS -> (kl, lse_i, z); LOGITS -> (lse_i, z); GRADS (scaled by `grad`, from
    `saved` = (lse_i, z)) -> (dqi, dki, dw); ONE_SWEEP (unscaled, from `saved`) -> (kl, dqi, dki, dw)."""
    B, T, HQ, D = q.shape
    HKV, HI, DI, NK = k.shape[2], q_idx.shape[2], q_idx.shape[3], indices.shape[2]
    G = HQ // HKV
    block_k, num_warps = SPARSE_CONFIG
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    kl = dqi = dki = dw = None
    if pass_ in (GRADS, ONE_SWEEP):
        lse_i, z = saved
        dqi, dki, dw = _grad_buffers(B, T, HI, DI, dev)
    else:
        lse_i, z = torch.empty(B, T, **f32), torch.empty(B, T, **f32)
    if pass_ in (LOSS, ONE_SWEEP):
        kl = torch.empty(B, T, **f32)
    dummy = lse
    _kl_sparse_kernel[(T, B)](
        q, k, lse, q_idx, k_idx, w, indices, doc if doc is not None else indices,
        kl if kl is not None else dummy, lse_i, z, dqi if dqi is not None else dummy,
        dki if dki is not None else dummy, dw if dw is not None else dummy, grad if grad is not None else dummy,
        *_strides(q), *_strides(k), *_strides(lse, 2), *_strides(q_idx), *_strides(k_idx, 2), *_strides(w, 2),
        *_strides(indices, 2), T, NK, HKV, HI, scale * 1.4426950408889634,
        G=G, BLOCK_H=_pow2(G), D=D, BLOCK_D=_pow2(D), BLOCK_HI=_pow2(HI), DI=DI, BLOCK_DI=_pow2(DI),
        BLOCK_K=block_k, HAS_DOC=doc is not None, PASS=pass_, PREC=_precision(q, q_idx),
        num_warps=num_warps,
    )
    return {LOSS: (kl, lse_i, z), LOGITS: (lse_i, z), GRADS: (dqi, dki, dw), ONE_SWEEP: (kl, dqi, dki, dw)}[pass_]


def _dense_blocks(G, HI):
    block_g = triton.next_power_of_2(G)
    block_hi = triton.next_power_of_2(HI)
    block_m = max(64 // block_g, 16 // min(block_hi, 16), 2)
    return block_g, block_hi, min(block_m, 64)


def _dense_launch(q, k, lse, q_idx, k_idx, w, doc, scale, backward, lse_i=None, grad=None):
    B, T, HQ, D = q.shape
    HKV, HI, DI = k.shape[2], q_idx.shape[2], q_idx.shape[3]
    G = HQ // HKV
    block_n, num_warps = DENSE_CONFIG
    block_g, block_hi, block_m = _dense_blocks(G, HI)
    dev = q.device
    kl = dqi = dki = dw = None
    if backward:
        dqi, dki, dw = _grad_buffers(B, T, HI, DI, dev)
    else:
        kl, lse_i = (torch.empty(B, T, device=dev, dtype=torch.float32) for _ in range(2))
    dummy = lse
    _kl_dense_kernel[(triton.cdiv(T, block_m), B)](
        q, k, lse, q_idx, k_idx, w, doc if doc is not None else lse,
        kl if kl is not None else dummy, lse_i, dqi if dqi is not None else dummy,
        dki if dki is not None else dummy, dw if dw is not None else dummy, grad if grad is not None else dummy,
        *_strides(q), *_strides(k), *_strides(lse, 2), *_strides(q_idx), *_strides(k_idx, 2), *_strides(w, 2),
        T, HKV, HQ, HI, scale * 1.4426950408889634,
        G=G, BLOCK_G=block_g, D=D, BLOCK_D=_pow2(D), BLOCK_HI=block_hi, DI=DI, BLOCK_DI=_pow2(DI),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_DOC=doc is not None, BACKWARD=backward,
        PREC=_precision(q, q_idx), num_warps=num_warps,
    )
    return (dqi, dki, dw) if backward else (kl, lse_i)


def dense_lse(q, k, doc, scale):
    """Per-head natural-log log-sum-exp [B, T, HQ] (fp32) of the scaled causal (same-document) logits."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    block_n, num_warps = DENSE_CONFIG
    block_g, _, block_m = _dense_blocks(G, 1)
    lse = torch.empty(B, T, HQ, device=q.device, dtype=torch.float32)
    _dense_lse_kernel[(triton.cdiv(T, block_m), B, HKV)](
        q, k, doc if doc is not None else lse, lse, *_strides(q), *_strides(k), *_strides(lse, 2),
        T, HKV, scale * 1.4426950408889634, G=G, BLOCK_G=block_g, D=D, BLOCK_D=_pow2(D), BLOCK_M=block_m,
        BLOCK_N=block_n, HAS_DOC=doc is not None, PREC=_precision(q), num_warps=num_warps,
    )
    return lse


class IndexerKLFunction(torch.autograd.Function):
    """mean_t KL(p_t || softmax(I_t)); indices None: dense warm-up, else the sparse stage (attn_lse required)."""

    @staticmethod
    def forward(ctx, q, k, q_idx, k_idx, weights, indices, attn_lse, doc, scale, one_sweep=False):
        B, T = q.shape[:2]
        ctx.scale, ctx.grads = scale, None
        if indices is None:
            lse = dense_lse(q, k, doc, scale)
            kl, lse_i = _dense_launch(q, k, lse, q_idx, k_idx, weights, doc, scale, backward=False)
            saved = (lse_i,)
        elif one_sweep:
            lse = attn_lse.float().contiguous()
            saved = _sparse_launch(q, k, lse, q_idx, k_idx, weights, indices, doc, scale, LOGITS)
            kl, *grads = _sparse_launch(q, k, lse, q_idx, k_idx, weights, indices, doc, scale, ONE_SWEEP,
                                        saved=saved)
            ctx.save_for_backward(*grads)  # the backward only scales them
            ctx.grads, ctx.dtypes = True, (q_idx.dtype, k_idx.dtype, weights.dtype)
            return kl.sum() / (B * T)
        else:
            lse = attn_lse.float().contiguous()
            kl, lse_i, z = _sparse_launch(q, k, lse, q_idx, k_idx, weights, indices, doc, scale, LOSS)
            saved = (lse_i, z)
        ctx.save_for_backward(q, k, lse, q_idx, k_idx, weights, indices, doc, *saved)
        return kl.sum() / (B * T)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads:
            dqi, dki, dw = ctx.saved_tensors
            dtypes = ctx.dtypes
            g = grad.float() / (dqi.shape[0] * dqi.shape[1])
            return (None, None, (dqi * g).to(dtypes[0]), (dki * g).to(dtypes[1]), (dw * g).to(dtypes[2]),
                    None, None, None, None, None)
        q, k, lse, q_idx, k_idx, weights, indices, doc, *saved = ctx.saved_tensors
        B, T = q.shape[:2]
        g = (grad.float() / (B * T)).reshape(1).contiguous()
        if indices is None:
            dqi, dki, dw = _dense_launch(q, k, lse, q_idx, k_idx, weights, doc, ctx.scale, backward=True,
                                         lse_i=saved[0], grad=g)
        else:
            dqi, dki, dw = _sparse_launch(q, k, lse, q_idx, k_idx, weights, indices, doc, ctx.scale, GRADS,
                                          saved=saved, grad=g)
        return (None, None, dqi.to(q_idx.dtype), dki.to(k_idx.dtype), dw.to(weights.dtype),
                None, None, None, None, None)


def _prepare(q, k, q_idx, k_idx, weights):
    # the products need one dtype per pair (under autocast the index keys may come out of a LayerNorm in fp32);
    # casting here keeps the gradient flowing back to k_idx in its own dtype
    k, k_idx = k.to(q.dtype), k_idx.to(q_idx.dtype)
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in (q.detach(), k.detach(), q_idx, k_idx, weights))


def indexer_kl_dense_triton(q, k, q_idx, k_idx, weights, *, scale, cu_seqlens=None):
    """Backend entry point with `indexer_kl_dense`'s signature (minus ``block`` and ``backend``)."""
    q, k, q_idx, k_idx, weights = _prepare(q, k, q_idx, k_idx, weights)
    doc = _doc_starts(cu_seqlens, q.shape[1], q.device)
    return IndexerKLFunction.apply(q, k, q_idx, k_idx, weights, None, None, doc, float(scale))


def indexer_kl_sparse_triton(q, k, q_idx, k_idx, weights, indices, *, scale, cu_seqlens=None, attn_lse=None,
                             forward_recomputed=False):
    """Backend entry point with `indexer_kl_sparse`'s signature (minus ``block`` and ``backend``); needs the
    sparse attention's ``attn_lse``. ``forward_recomputed`` (activation checkpointing runs the forward twice)
    takes the two sweeps: one sweep would compute the gradients in both forwards."""
    if attn_lse is None:
        raise ValueError("indexer_kl_sparse[triton] needs attn_lse (the sparse attention's log-sum-exp)")
    q, k, q_idx, k_idx, weights = _prepare(q, k, q_idx, k_idx, weights)
    doc = _doc_starts(cu_seqlens, q.shape[1], q.device)
    indices = indices.to(torch.int32).contiguous()
    # ctx.needs_input_grad does not see no_grad: decide here whether the gradients will be wanted
    one_sweep = (SPARSE_ONE_SWEEP and not forward_recomputed and torch.is_grad_enabled()
                 and any(x.requires_grad for x in (q_idx, k_idx, weights)))
    return IndexerKLFunction.apply(q, k, q_idx, k_idx, weights, indices, attn_lse.detach(), doc, float(scale),
                                   one_sweep)
