"""Triton kernels for the DSA lightning indexer (DeepSeek-V3.2, arXiv 2512.02556): scores and top-k selection.

``I[t, s] = sum_j w[t, j] * relu(q_idx[t, j] . k_idx[s])`` in fp32, each tile one matrix product over all index
heads (rows ``t * HI + j`` of q_idx are contiguous). Selections (``select=``), all returning each row's indices in
position order:

- ``threshold`` (the default for topk >= 256), which never writes a ``[rows, keys]`` score block:
  1. ``_index_scores_kernel`` with ``STRIDE`` S scores one key per S-wide stratum (at a hashed offset); the
     r-th best sample of a row is its threshold (``threshold_plan`` picks S, r and the capacity CAP = 2 topk
     rounded up to a power of 2 so that the threshold lands between the k-th and the CAP-th score);
  2. ``_candidates_kernel`` streams over each row block's visible keys and keeps, in position order, every key
     scoring at or above the threshold (at most CAP; the count is kept even past CAP);
  3. ``_select_candidates_kernel`` keeps the keys above each row's k-th best candidate score (torch.topk over the
     candidate buffer, or with ``KTH = "search"`` a bitwise search over order-preserving uint32 keys in the kernel)
     and the earliest keys tied with it (the reference's tie rule), still in position order.
  Rows whose threshold missed (fewer than topk candidates, or more than CAP) are redone exactly in PyTorch
  (``exact_rows``; about one row in a thousand on random data, counted in ``STATS``).
- ``torch``: full score rows in chunks under a memory budget (``SCORE_BUDGET``), then ``torch.topk``.
- ``radix`` / ``radix11``: the same chunks, then ``_radix_topk_kernel`` (histogram passes over 8- or 11-bit digits
  of order-preserving uint32 keys find the exact k-th key; measured slower than torch.topk, kept for reference).

Shapes: q_idx ``[B, Tq, HI, DI]``, k_idx ``[B, Tk, DI]``, weights ``[B, Tq, HI]``, output ``[B, Tq, topk]`` int64
(queries are the last Tq key positions; with ``cu_seqlens`` the indices are offsets within the document).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..indexer import _scores, position_order, select_topk
from .sparse_attention import _doc_starts

# fp32 score elements per chunk of query rows (1 GiB): bounds memory at long context
SCORE_BUDGET = 1 << 28
# rows the threshold selection had to redo exactly since the last reset (benchmarks and tests read it)
STATS = {"exact_rows": 0}
INT64_MIN: tl.constexpr = tl.constexpr(-(2**63))


@triton.jit
def _sample_keys(cols, STRIDE: tl.constexpr):
    """Key sampled by score column `cols`: every key when STRIDE is 1, else one key per STRIDE-wide stratum at a
    hashed offset (stratified sampling, so a period in the data cannot alias with the stride)."""
    if STRIDE == 1:
        return cols
    h = (cols.to(tl.uint32) * 1103515245 + 12345) >> 16
    return cols * STRIDE + (h & (STRIDE - 1)).to(tl.int32)


@triton.jit
def _query_block(Q, W, b, row0, t1, sq_b, sq_t, sw_b, sw_t,
                 HI: tl.constexpr, HI_P2: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Index queries of rows row0 .. row0 + BLOCK_M as one [BLOCK_M * HI_P2, BLOCK_DI] matrix (token r // HI_P2,
    index head r % HI_P2) and their head weights."""
    tok = row0 + tl.arange(0, BLOCK_M * HI_P2) // HI_P2
    return _query_rows(Q, W, b, tok, tok < t1, sq_b, sq_t, sw_b, sw_t, HI, HI_P2, DI, BLOCK_DI, BLOCK_M)


@triton.jit
def _query_rows(Q, W, b, tok, ok, sq_b, sq_t, sw_b, sw_t,
                HI: tl.constexpr, HI_P2: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """_query_block for any rows: product row r is token tok[r] (where ok[r]), index head r % HI_P2."""
    head = tl.arange(0, BLOCK_M * HI_P2) % HI_P2
    rmask = ok & (head < HI)
    d = tl.arange(0, BLOCK_DI)
    q = tl.load(Q + b * sq_b + tok.to(tl.int64)[:, None] * sq_t + head[:, None] * DI + d[None, :],
                mask=rmask[:, None] & (d[None, :] < DI), other=0.0)
    w = tl.load(W + b * sw_b + tok.to(tl.int64) * sw_t + head, mask=rmask, other=0.0)
    return q, w


@triton.jit
def _score_tile(q, w, kbase, keys, sk_t, Tk, DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_M: tl.constexpr,
                HI_P2: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] index scores of the query block against keys `keys`: one product over all heads."""
    d = tl.arange(0, BLOCK_DI)
    kt = tl.load(kbase + keys.to(tl.int64)[:, None] * sk_t + d[None, :],
                 mask=(keys[:, None] < Tk) & (d[None, :] < DI), other=0.0)  # [BLOCK_N, BLOCK_DI]
    dots = tl.dot(q, tl.trans(kt), input_precision=PRECISION)  # [BLOCK_M * HI_P2, BLOCK_N]
    contrib = tl.maximum(dots, 0.0) * w[:, None]
    return tl.sum(tl.reshape(contrib, (BLOCK_M, HI_P2, BLOCK_N)), 1)


@triton.jit
def _row_ranges(LO, HI_, rows, t1):
    valid_row = rows < t1
    row_lo = tl.load(LO + rows, mask=valid_row, other=0)
    row_hi = tl.load(HI_ + rows, mask=valid_row, other=0)
    return valid_row, row_lo, row_hi, tl.min(tl.where(valid_row, row_lo, 2**30)), tl.max(row_hi)


@triton.jit
def _index_scores_kernel(
    Q, K_, W, S, LO, HI_, t0, t1, Tk, NCOLS,
    sq_b, sq_t, sk_b, sk_t, sw_b, sw_t, ss_b, ss_r,
    HI: tl.constexpr, HI_P2: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_TILES: tl.constexpr, PRECISION: tl.constexpr,
    STRIDE: tl.constexpr = 1,
):
    """Column c of a score row holds key c (STRIDE = 1) or, sampling, key c * STRIDE + jitter(c)."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    row0 = t0 + pid_m * BLOCK_M
    q, w = _query_block(Q, W, b, row0, t1, sq_b, sq_t, sw_b, sw_t, HI, HI_P2, DI, BLOCK_DI, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    valid_row, row_lo, row_hi, lo, hi = _row_ranges(LO, HI_, rows, t1)
    out = S + b * ss_b + (rows - t0).to(tl.int64)[:, None] * ss_r
    for j in tl.static_range(N_TILES):
        n0 = (pid_n * N_TILES + j) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        keys = _sample_keys(cols, STRIDE)
        smask = valid_row[:, None] & (cols[None, :] < NCOLS)
        if (n0 * STRIDE < hi) & ((n0 + BLOCK_N) * STRIDE > lo):
            scores = _score_tile(q, w, K_ + b * sk_b, keys, sk_t, Tk, DI, BLOCK_DI, BLOCK_M, HI_P2, BLOCK_N,
                                 PRECISION)
            seen = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] < row_hi[:, None])
            tl.store(out + cols[None, :], tl.where(seen, scores, float("-inf")), mask=smask)
        else:
            # a plain top-k over the chunk's rows may read these: they must rank below every visible key
            tl.store(out + cols[None, :], tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32), mask=smask)


@triton.jit
def _candidates_kernel(
    Q, K_, W, TAU, LO, HI_, CV, CI, CNT, TOT, ORDER, t0, t1, Tk,
    sq_b, sq_t, sk_b, sk_t, sw_b, sw_t, sc_b, sc_r, sn_b, st_b,
    HI: tl.constexpr, HI_P2: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAP: tl.constexpr, TOPK: tl.constexpr, PRECISION: tl.constexpr,
    RANK_TIES: tl.constexpr = True, ORDERED: tl.constexpr = False,
):
    """Stream over a row block's visible keys and keep, in position order, every key scoring above the row's
    threshold and (RANK_TIES) only the keys scoring exactly the threshold that can still be selected, or (not
    RANK_TIES) every tie too, one prefix product a tile instead of two (a row whose ties overflow CAP is then redone
    exactly): values and offsets (key - first visible key) into CV / CI [B, rows, CAP]. CNT counts the kept keys,
    also those that did not fit (CNT > CAP: overflow); TOT counts every key at or above the threshold (TOT <
    min(topk, visible keys): the threshold was too high). ORDERED: block m takes the rows t0 + ORDER[b, m *
    BLOCK_M:(m + 1) * BLOCK_M] (a permutation of the chunk's row offsets) and this launch does it if any of them has
    a threshold of exactly 0 == RANK_TIES."""
    pid_m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    row0 = t0 + pid_m * BLOCK_M
    if ORDERED:
        n_rows = t1 - t0
        slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = t0 + tl.load(ORDER + b * st_b + slots, mask=slots < n_rows, other=0)
        tau = tl.load(TAU + b * sn_b + (rows - t0), mask=slots < n_rows, other=float("inf"))
        zero_tau = tl.max(((slots < n_rows) & (tau == 0)).to(tl.int32), 0)
        # this launch's rows of the block: all or none (a scalar count, not a scalar bool: and-ing a 0-d bool into
        # a mask fails in triton 3.9's interpreter)
        n_mine = tl.where((zero_tau > 0) == RANK_TIES, n_rows, 0)
        rows = tl.where(slots < n_mine, rows, t1)  # t1: no row (the other launch does this block)
        pslots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M * HI_P2) // HI_P2
        tok = t0 + tl.load(ORDER + b * st_b + pslots, mask=pslots < n_rows, other=0)
        q, w = _query_rows(Q, W, b, tok, pslots < n_mine, sq_b, sq_t, sw_b, sw_t, HI, HI_P2, DI, BLOCK_DI, BLOCK_M)
    else:
        q, w = _query_block(Q, W, b, row0, t1, sq_b, sq_t, sw_b, sw_t, HI, HI_P2, DI, BLOCK_DI, BLOCK_M)
        rows = row0 + tl.arange(0, BLOCK_M)
    valid_row, row_lo, row_hi, lo, hi = _row_ranges(LO, HI_, rows, t1)
    tau = tl.load(TAU + b * sn_b + (rows - t0), mask=valid_row, other=float("inf"))
    base = (rows - t0).to(tl.int64)[:, None] * sc_r + b * sc_b
    count = tl.zeros([BLOCK_M], tl.int32)
    total = tl.zeros([BLOCK_M], tl.int32)
    ties = tl.zeros([BLOCK_M], tl.int32)
    j = tl.arange(0, BLOCK_N)
    # prefix sums along a tile's rows as a product with an upper-triangular ones matrix (exact: 0/1 products summed
    # in fp32). tl.cumsum along axis 1 of the tile gave wrong sums on an H100 (triton 3.6, bf16 inputs).
    upper = (j[:, None] <= j[None, :]).to(tl.float16)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        keys = n0 + j
        scores = _score_tile(q, w, K_ + b * sk_b, keys, sk_t, Tk, DI, BLOCK_DI, BLOCK_M, HI_P2, BLOCK_N, PRECISION)
        seen = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] < row_hi[:, None])
        if RANK_TIES:
            gt = seen & (scores > tau[:, None])
            eq = seen & (scores == tau[:, None])
            # (ranking ties only in tiles that have any, under an `if`, failed to compile on an H100, triton 3.6)
            tie_rank = ties[:, None] + tl.dot(eq.to(tl.float16), upper).to(tl.int32)
            # the selection takes the first TOPK - (keys above the threshold) ties; the keys above it in earlier
            # tiles (total - ties) are a lower bound of those, so a tie ranked past TOPK minus them is never taken
            keep = gt | (eq & (tie_rank <= TOPK - (total - ties)[:, None]))
            n_eq = tl.sum(eq.to(tl.int32), 1)
            ties += n_eq
            total += tl.sum(gt.to(tl.int32), 1) + n_eq
        else:
            keep = seen & (scores >= tau[:, None])
            total += tl.sum(keep.to(tl.int32), 1)
        slot = count[:, None] + tl.dot(keep.to(tl.float16), upper).to(tl.int32) - 1
        put = keep & (slot < CAP)
        tl.store(CV + base + slot, scores, mask=put)
        tl.store(CI + base + slot, keys[None, :] - row_lo[:, None], mask=put)
        count += tl.sum(keep.to(tl.int32), 1)
    tl.store(CNT + b * sn_b + (rows - t0), count, mask=valid_row)
    tl.store(TOT + b * sn_b + (rows - t0), total, mask=valid_row)


@triton.jit
def _select_candidates_kernel(
    CV, CI, CNT, KTH, OUT, t0, sc_b, sc_r, sn_b, so_b, so_t,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, CAP: tl.constexpr, SEARCH: tl.constexpr,
):
    """Per row: the TOPK best of its candidates (ties towards the earlier key, as the reference's stable sort),
    written in position order and padded with -1. The k-th best score is found here (SEARCH: a bitwise search
    over order-preserving uint32 keys, 32 counting passes over the row in registers) or read from KTH."""
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = tl.minimum(tl.load(CNT + b * sn_b + r), CAP)
    c = tl.arange(0, CAP)
    valid = c < n
    vals = tl.load(CV + b * sc_b + r.to(tl.int64) * sc_r + c, mask=valid, other=float("-inf"))
    if SEARCH:
        # -0.0 and 0.0 tie in the reference; give them one key. The k-th key is the largest u with at least
        # TOPK keys >= u, built bit by bit from the top.
        none = tl.zeros([1], tl.uint32)
        key = tl.where(valid, _ordered_key(tl.where(vals == 0.0, 0.0, vals)), none)
        kth = none
        for bit in tl.static_range(31, -1, -1):
            trial = kth | tl.full([1], 1 << bit, tl.uint32)
            ok = tl.sum((key[None, :] >= trial[:, None]).to(tl.int32), 1) >= TOPK
            kth = tl.where(ok, trial, kth)
        kth = tl.where(n > TOPK, kth, none)  # fewer candidates than TOPK: every one is kept
        gt = valid & (key > kth)
        tie = valid & (key == kth)
    else:
        tau = tl.where(n > TOPK, tl.load(KTH + b * sn_b + r), float("-inf"))
        gt = valid & (vals > tau)
        tie = valid & (vals == tau)
    need = TOPK - tl.sum(gt.to(tl.int32))
    sel = gt | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
    slot = tl.cumsum(sel.to(tl.int32), 0) - 1
    out = OUT + b * so_b + (t0 + r).to(tl.int64) * so_t
    k = tl.arange(0, TOPK_P2)
    tl.store(out + k, tl.full([TOPK_P2], -1, tl.int64), mask=(k >= tl.minimum(n, TOPK)) & (k < TOPK))
    idx = tl.load(CI + b * sc_b + r.to(tl.int64) * sc_r + c, mask=sel, other=0)
    tl.store(out + slot, idx.to(tl.int64), mask=sel)


@triton.jit
def _ordered_key(x):
    """uint32 keys whose unsigned order is the float order of x (fp32)."""
    bits = x.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return bits ^ flip


@triton.jit
def _radix_pass(row, lo, hi, prefix, prefix_mask, need, SHIFT: tl.constexpr, NBINS: tl.constexpr,
                BLOCK: tl.constexpr):
    """Narrow the k-th largest key to one more digit: returns the new prefix, its mask and the count still needed."""
    hist = tl.zeros([NBINS], tl.int32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < hi
        key = _ordered_key(tl.load(row + offs, mask=m, other=0.0))
        m = m & ((key & prefix_mask) == prefix)
        digit = ((key >> SHIFT) & (NBINS - 1)).to(tl.int32)
        hist += tl.histogram(digit, NBINS, mask=m)
    bins = tl.arange(0, NBINS)
    at_or_above = tl.sum(hist) - tl.cumsum(hist, 0) + hist  # [NBINS]: count with digit >= bin
    chosen = tl.max(tl.where(at_or_above >= need, bins, -1))
    above = tl.sum(tl.where(bins > chosen, hist, 0))
    prefix = prefix | (chosen.to(tl.uint32) << SHIFT)
    prefix_mask = prefix_mask | (tl.full([], NBINS - 1, tl.uint32) << SHIFT)
    return prefix, prefix_mask, need - above


@triton.jit
def _radix_topk_kernel(
    S, LO, HI_, OUT, t0, ss_b, ss_r, so_b, so_t,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = t0 + r
    lo = tl.load(LO + t)
    hi = tl.load(HI_ + t)
    row = S + b * ss_b + r.to(tl.int64) * ss_r
    out = OUT + b * so_b + t.to(tl.int64) * so_t
    n = hi - lo
    # threshold key and how many keys equal to it to keep; short rows keep every key (all keys > 0)
    tau = tl.zeros([], tl.uint32)
    need_eq = tl.zeros([], tl.int32)
    if n > TOPK:
        prefix = tl.zeros([], tl.uint32)
        pmask = tl.zeros([], tl.uint32)
        need = TOPK
        if DIGIT_BITS == 8:
            prefix, pmask, need = _radix_pass(row, lo, hi, prefix, pmask, need, 24, 256, BLOCK)
            prefix, pmask, need = _radix_pass(row, lo, hi, prefix, pmask, need, 16, 256, BLOCK)
            prefix, pmask, need = _radix_pass(row, lo, hi, prefix, pmask, need, 8, 256, BLOCK)
            prefix, pmask, need = _radix_pass(row, lo, hi, prefix, pmask, need, 0, 256, BLOCK)
        else:
            prefix, pmask, need = _radix_pass(row, lo, hi, prefix, pmask, need, 21, 2048, BLOCK)
            prefix, pmask, need = _radix_pass(row, lo, hi, prefix, pmask, need, 10, 2048, BLOCK)
            prefix, pmask, need = _radix_pass(row, lo, hi, prefix, pmask, need, 0, 1024, BLOCK)
        tau = prefix
        need_eq = need
    n_gt = tl.minimum(n, TOPK) - need_eq
    written_gt = tl.zeros([], tl.int32)
    written_eq = tl.zeros([], tl.int32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < hi
        key = _ordered_key(tl.load(row + offs, mask=m, other=0.0))
        gt = m & (key > tau)
        eq = m & (key == tau)
        slot_gt = written_gt + tl.cumsum(gt.to(tl.int32), 0) - 1
        slot_eq = written_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
        take_eq = eq & (slot_eq < need_eq)
        slot = tl.where(gt, slot_gt, n_gt + slot_eq)
        # key in the high half (sign-flipped so signed order is key order), offset in the low half
        packed = ((key ^ 0x80000000).to(tl.int32, bitcast=True).to(tl.int64) << 32) | (offs - lo).to(tl.int64)
        tl.store(out + slot, packed, mask=gt | take_eq)
        written_gt += tl.sum(gt.to(tl.int32))
        written_eq += tl.sum(eq.to(tl.int32))
    tl.debug_barrier()
    k = tl.arange(0, TOPK_P2)
    n_sel = tl.minimum(n, TOPK)
    packed = tl.load(out + k, mask=k < n_sel, other=INT64_MIN)
    packed = tl.sort(packed, descending=True)
    idx = tl.where(packed == INT64_MIN, -1, packed.to(tl.int32).to(tl.int64))
    tl.store(out + k, idx, mask=k < TOPK)


def _visible_range(Tq: int, Tk: int, cu_seqlens, device):
    """First visible key and one past the last, per query row [Tq] (int32)."""
    hi = torch.arange(Tk - Tq + 1, Tk + 1, device=device, dtype=torch.int32)
    doc = _doc_starts(cu_seqlens, Tq, device)
    lo = torch.zeros_like(hi) if doc is None else doc
    return lo, hi


def _tile_args(q, block_m: int) -> dict:
    """Compile-time parameters shared by the index-score kernels: BLOCK_M query rows x HI_P2 heads per product (fewer
    rows with more than 4 heads, so the product stays 128 rows)."""
    HI, DI = q.shape[2], q.shape[3]
    hi_p2 = triton.next_power_of_2(HI)
    return {"HI": HI, "HI_P2": hi_p2, "DI": DI, "BLOCK_DI": max(16, triton.next_power_of_2(DI)),
            "BLOCK_M": max(1, block_m * 4 // hi_p2) if hi_p2 > 4 else block_m,
            "PRECISION": "tf32x3" if q.dtype == torch.float32 else None}


def indexer_scores_chunk(q, k, w, lo, hi, t0, t1, scores, block_m=32, block_n=128, n_tiles=4, num_warps=8,
                         stride=1):
    """Fill scores[:, :t1 - t0, :] with the index scores of query rows t0:t1 (only their visible keys); scores may
    be narrower than Tk (the chunk's causal width), never wider. With ``stride`` > 1 (a power of 2) column c holds
    the score of one sampled key in [c * stride, (c + 1) * stride) instead."""
    B, Tk = q.shape[0], k.shape[1]
    args = _tile_args(q, block_m)
    key_end = Tk - q.shape[1] + t1  # causal: the chunk sees no key past its last row
    grid = (triton.cdiv(t1 - t0, args["BLOCK_M"]), triton.cdiv(triton.cdiv(key_end, stride), block_n * n_tiles), B)
    _index_scores_kernel[grid](
        q, k, w, scores, lo, hi, t0, t1, Tk, scores.shape[-1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), w.stride(0), w.stride(1), scores.stride(0),
        scores.stride(1), **args, BLOCK_N=block_n, N_TILES=n_tiles, STRIDE=stride, num_warps=num_warps,
    )


def radix_topk_chunk(scores, lo, hi, t0, t1, out, topk, block=1024, num_warps=8, digit_bits=8):
    """Write out[:, t0:t1] from score rows scores[:, :t1 - t0] whose visible keys are lo[t]:hi[t]."""
    B = scores.shape[0]
    _radix_topk_kernel[(t1 - t0, B)](
        scores, lo, hi, out, t0, scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
        TOPK=topk, TOPK_P2=triton.next_power_of_2(topk), BLOCK=block, DIGIT_BITS=digit_bits, num_warps=num_warps,
    )


def torch_topk_chunk(scores, lo, t0, t1, key_end, out, topk):
    """Same contract as radix_topk_chunk, through torch.topk (invisible keys already hold -inf)."""
    kk = min(topk, key_end)
    vals, idx = torch.topk(scores[:, : t1 - t0, :key_end], kk, dim=-1, sorted=False)  # [B, c, kk]
    idx = (idx - lo[t0:t1, None]).masked_fill_(vals == float("-inf"), -1)
    out[:, t0:t1, :kk] = position_order(idx)
    out[:, t0:t1, kk:] = -1


def threshold_plan(topk: int):
    """(sample stride S, sample rank r, candidate capacity CAP) of the threshold selection.

    Each row's r-th best sampled score (one key in S) is its threshold: the top-k keys hold about topk / S samples
    and the best CAP keys about CAP / S, so r sits the same number of standard deviations (~3.3 for topk 2048)
    from both, and a row falls back to the exact path (too few keys at or above its threshold, or more than CAP
    candidates) about once in a thousand rows on random scores. Rows whose top-k lies inside a large exact tie
    (e.g. the zeros of a row whose index head weights are all negative) stay on the fast path: only the first
    topk tied keys become candidates."""
    cap = triton.next_power_of_2(2 * topk)
    stride = max(1, triton.next_power_of_2(topk // 64 + 1) // 2)  # ~64-128 samples inside the true top-k
    lo, hi = topk / stride, cap / stride
    rank = int(round((lo * hi ** 0.5 + hi * lo ** 0.5) / (lo ** 0.5 + hi ** 0.5)))
    return stride, rank, cap


def threshold_buffers(rows: int, Tk: int, topk: int, device) -> dict:
    """Scratch for threshold selection over up to `rows` query rows (batch included) of Tk keys."""
    stride, _, cap = threshold_plan(topk)
    return {"samples": torch.empty(rows * triton.cdiv(Tk, stride), device=device),
            "values": torch.empty(rows * cap, device=device),
            "offsets": torch.empty(rows * cap, device=device, dtype=torch.int32),
            "count": torch.empty(rows, device=device, dtype=torch.int32),
            "total": torch.empty(rows, device=device, dtype=torch.int32)}


def row_thresholds(q, k, w, lo, hi, t0, t1, topk, buf):
    """[B, rows] threshold of each query row t0:t1: the r-th best of its sampled scores (-inf when a row has
    fewer than r visible samples: it keeps every key)."""
    B, Tq = q.shape[:2]
    stride, rank, _ = threshold_plan(topk)
    n_samples = triton.cdiv(k.shape[1] - Tq + t1, stride)
    samples = buf[: B * (t1 - t0) * n_samples].view(B, t1 - t0, n_samples)
    indexer_scores_chunk(q, k, w, lo, hi, t0, t1, samples, stride=stride)
    if n_samples < rank:
        return torch.full((B, t1 - t0), float("-inf"), device=q.device)
    return torch.topk(samples, rank, dim=-1, sorted=True).values[..., -1].contiguous()


# The candidate pass: (BLOCK_M query rows, BLOCK_N keys a tile, num_warps), and where exact ties with a row's
# threshold are ranked in the kernel: True (every row block), False (none: a row whose ties overflow the buffer is
# redone exactly) or "grouped" (only the rows whose threshold is exactly 0, where ReLU's zeros make large ties: e.g.
# a token whose index-head weights are all negative scores every key <= 0. A stable sort puts those rows into row
# blocks of their own, which rank ties; the other blocks keep every tie with one prefix product a tile). On an H100
# (run 12, 2026-12-06, the last 32,768 rows at T = 65,536) the pass took 20.1 ms ranking ties and 12.3 ms keeping
# them with (32, 64, 8), 17.5 and 11.4 ms with (16, 64, 4); a count-only floor (same scores, no compaction)
# 4.3-4.8 ms. Run 14 (2026-12-06): "grouped" 12.0 ms against 15.4 ms for ranking in every 16-row block that held
# such a row in position order (with random weights 1 token in 16 has one, so 64% of blocks did).
# `bench_topk.py --candidates` times the choices.
CANDIDATE_CONFIG = (16, 64, 4)
RANK_TIES = "grouped"


def keep_candidates(q, k, w, tau, lo, hi, t0, t1, topk, bufs, config=None, rank_ties=None):
    """Candidate values, offsets [B, rows, CAP] and the counts `count` (kept) and `total` (at or above tau).
    `config` (BLOCK_M, BLOCK_N, num_warps) and `rank_ties` default to CANDIDATE_CONFIG and RANK_TIES."""
    block_m, block_n, num_warps = config or CANDIDATE_CONFIG
    mode = RANK_TIES if rank_ties is None else rank_ties
    if mode not in (True, False, "grouped"):
        raise ValueError(f"keep_candidates: rank_ties must be True, False or 'grouped', got {mode!r}")
    B, c, cap = q.shape[0], t1 - t0, threshold_plan(topk)[2]
    cand_v = bufs["values"][: B * c * cap].view(B, c, cap)
    cand_i = bufs["offsets"][: B * c * cap].view(B, c, cap)
    count = bufs["count"][: B * c].view(B, c)
    total = bufs["total"][: B * c].view(B, c)
    args = _tile_args(q, block_m)
    n_blocks = triton.cdiv(c, args["BLOCK_M"])
    order = tau  # read only when the rows are grouped
    if mode == "grouped":  # [B, rows]: the row offsets, those with a zero threshold first, each group in order
        order = torch.argsort((tau != 0).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    for rank in (False, True) if mode == "grouped" else (mode,):
        _candidates_kernel[(n_blocks, B)](
            q, k, w, tau, lo, hi, cand_v, cand_i, count, total, order, t0, t1, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), w.stride(0), w.stride(1), cand_v.stride(0),
            cand_v.stride(1), count.stride(0), order.stride(0), **args, BLOCK_N=block_n, CAP=cap, TOPK=topk,
            RANK_TIES=rank, ORDERED=mode == "grouped", num_warps=num_warps,
        )
    return cand_v, cand_i, count, total


# how select_candidates finds each row's k-th candidate by default: "search" (a bitwise search inside the select
# kernel) or "torch" (torch.topk over the candidate buffer). On an H100 (2026-12-06, run 11) the GPU tests of both
# passed and `bench_topk.py --stages` timed k-th + select over 32,768 rows at 2.06 ms (search) vs 4.34 ms (torch).
KTH = "search"


def select_candidates(cand_v, cand_i, count, t0, out, topk, kth=None):
    """out[:, t0:t0 + rows]: each row's topk best candidates, in position order, -1 padded. ``kth``: how the k-th
    best candidate score is found: ``"search"`` (in the kernel) or ``"torch"`` (torch.topk over the candidates);
    None: ``KTH``."""
    B, c, cap = cand_v.shape
    kth = KTH if kth is None else kth
    kth_v = count  # unused by the kernel when it searches
    if kth == "torch":  # slots past a row's count hold -inf
        filled = torch.arange(cap, device=cand_v.device) < count[..., None].clamp(max=cap)
        kth_v = torch.topk(cand_v.masked_fill_(~filled, float("-inf")), topk, dim=-1, sorted=False).values.amin(-1)
    elif kth != "search":
        raise ValueError(f"select_candidates: kth must be 'search' or 'torch', got {kth!r}")
    _select_candidates_kernel[(c, B)](
        cand_v, cand_i, count, kth_v, out, t0, cand_v.stride(0), cand_v.stride(1), count.stride(0), out.stride(0),
        out.stride(1), TOPK=topk, TOPK_P2=triton.next_power_of_2(topk), CAP=cap, SEARCH=kth == "search",
        num_warps=4,
    )


def threshold_topk_chunk(q, k, w, lo, hi, t0, t1, out, topk, bufs):
    """out[:, t0:t1] by threshold selection, never writing a [rows, keys] score block: per row a threshold from a
    stratified sample of its scores, one streaming pass that keeps the keys above it (in position order), then
    the exact top-k of those candidates. Rows whose threshold missed (fewer than topk keys at or above it, or
    more than CAP candidates) are returned, (b, row in chunk), for `exact_rows`."""
    tau = row_thresholds(q, k, w, lo, hi, t0, t1, topk, bufs["samples"])
    cand_v, cand_i, count, total = keep_candidates(q, k, w, tau, lo, hi, t0, t1, topk, bufs)
    select_candidates(cand_v, cand_i, count, t0, out, topk)
    visible = (hi[t0:t1] - lo[t0:t1]).clamp(max=topk)
    missed = (count > cand_v.shape[-1]) | (total < visible)
    return missed.nonzero()  # [n, 2]: (b, row within the chunk)


def exact_rows(q, k, w, lo, hi, rows, out, topk, budget=1 << 26):
    """Redo out[b, t] for the given (b, t) pairs with the reference's scores and selection (`select_topk`)."""
    Tk, HI = k.shape[1], q.shape[2]
    step = max(1, budget // max(1, HI * Tk))
    keys = torch.arange(Tk, device=q.device)
    for b in rows[:, 0].unique().tolist():
        ts = rows[rows[:, 0] == b, 1]
        for i in range(0, len(ts), step):
            t = ts[i:i + step]
            s = _scores(q[b, t][None], k[b][None], w[b, t][None])[0]  # [n, Tk]
            seen = (keys[None, :] >= lo[t, None]) & (keys[None, :] < hi[t, None])
            idx = select_topk(s.masked_fill(~seen, float("-inf")), topk)
            out[b, t] = torch.where(idx >= 0, idx - lo[t, None], -1)


def indexer_topk_triton(q_idx, k_idx, weights, topk, *, cu_seqlens=None, score_budget=None, select="auto"):
    """Backend entry point with the op's signature (minus ``backend``): int64 indices [B, Tq, topk], each row's
    valid indices in position order, then -1.

    ``select``: ``"threshold"`` (sampled threshold, streaming candidate pass, exact top-k of the candidates; memory
    O(rows x 2 topk), no score block), ``"torch"`` (the chunk's full scores, then torch.topk), ``"radix"`` /
    ``"radix11"`` (full scores, then the radix-select kernel with 8- or 11-bit digits), or ``"auto"``: threshold
    when topk >= 256 and there are at least 8 x topk keys, else torch (on an H100 at topk 2048, threshold was
    1.15x faster at 16k and 1.29x at 64k, 1.46x slower at 4k where every row fits in the candidate buffer;
    BENCHMARKS.md).
    """
    if select not in ("auto", "threshold", "torch", "radix", "radix11"):
        raise ValueError(f"indexer_topk_triton: select must be 'auto', 'threshold', 'torch', 'radix' or 'radix11', "
                         f"got {select!r}")
    if select == "auto":
        select = "threshold" if topk >= 256 and k_idx.shape[1] >= 8 * topk else "torch"
    B, Tq = q_idx.shape[:2]
    Tk = k_idx.shape[1]
    q = q_idx.contiguous()
    k = k_idx.to(q.dtype).contiguous()
    w = weights.float().contiguous()
    out = torch.empty(B, Tq, topk, device=q.device, dtype=torch.int64)
    if B * Tq == 0:
        return out
    lo, hi = _visible_range(Tq, Tk, cu_seqlens, q.device)
    # the leading rows that see at most topk keys select all of them, in position order, and need no scores (without
    # documents: the first topk - (Tk - Tq) query rows)
    start = 0 if cu_seqlens is not None else max(0, min(Tq, topk - (Tk - Tq)))
    if start:
        keys = torch.arange(topk, device=q.device)
        out[:, :start] = torch.where(keys[None, :] < hi[:start, None], keys[None, :], -1)
    budget = SCORE_BUDGET if score_budget is None else score_budget
    if select == "threshold":
        chunk = max(1, min(Tq, budget // max(1, 2 * B * threshold_plan(topk)[2])))
        bufs = threshold_buffers(B * chunk, Tk, topk, q.device)
        for t0 in range(start, Tq, chunk):
            t1 = min(Tq, t0 + chunk)
            missed = threshold_topk_chunk(q, k, w, lo, hi, t0, t1, out, topk, bufs)
            if missed.numel():
                STATS["exact_rows"] += missed.shape[0]
                exact_rows(q, k, w, lo, hi, missed + torch.tensor([0, t0], device=q.device), out, topk)
        return out
    chunk = max(1, min(Tq, budget // max(1, B * Tk)))
    buf = torch.empty(B * chunk * Tk, device=q.device, dtype=torch.float32)
    for t0 in range(start, Tq, chunk):
        t1 = min(Tq, t0 + chunk)
        # a contiguous [B, rows, causal width] block: torch.topk on a strided slice would copy it first
        scores = buf[: B * (t1 - t0) * (Tk - Tq + t1)].view(B, t1 - t0, Tk - Tq + t1)
        indexer_scores_chunk(q, k, w, lo, hi, t0, t1, scores)
        if select == "torch":
            torch_topk_chunk(scores, lo, t0, t1, Tk - Tq + t1, out, topk)
        else:
            radix_topk_chunk(scores, lo, hi, t0, t1, out, topk, digit_bits=8 if select == "radix" else 11)
            out[:, t0:t1] = position_order(out[:, t0:t1])
    return out
