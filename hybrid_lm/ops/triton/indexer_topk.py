"""Triton kernels for the DSA lightning indexer (DeepSeek-V3.2, arXiv 2512.02556): scores, then radix top-k.

``I[t, s] = sum_j w[t, j] * relu(q_idx[t, j] . k_idx[s])`` in fp32. Query rows are processed in chunks whose
``[rows, Tk]`` fp32 score block stays under a memory budget (never the whole ``[T, T]`` matrix):

1. ``_index_scores_kernel`` computes a ``[BLOCK_M, BLOCK_N]`` score tile per step with one matrix product over
   all index heads (rows ``t * HI + j`` of q_idx are contiguous); keys a row cannot see get ``-inf``, and tiles
   no row of the block can see are filled with ``-inf`` instead of computed.
2. Selection, per chunk: ``torch.topk`` (the default: on an H100 it beat the kernel below, see BENCHMARKS.md),
   or ``_radix_topk_kernel``, which selects each row's ``topk`` largest visible scores without sorting the row:
   scores become order-preserving uint32 keys, histogram passes over 8-bit (or 11-bit) digits find the exact
   k-th largest key, one pass writes the keys above it (and enough ties), and a bitonic sort of the ``topk``
   survivors (packed as key << 32 | index) puts them in descending score order. Rows with at most ``topk``
   visible keys skip the histograms and keep every key, padded with -1.

Shapes: q_idx ``[B, Tq, HI, DI]``, k_idx ``[B, Tk, DI]``, weights ``[B, Tq, HI]``, output ``[B, Tq, topk]`` int64
(queries are the last Tq key positions; with ``cu_seqlens`` the indices are offsets within the document).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_attention import _doc_starts

# fp32 score elements per chunk of query rows (1 GiB): bounds memory at long context
SCORE_BUDGET = 1 << 28
INT64_MIN: tl.constexpr = tl.constexpr(-(2**63))


@triton.jit
def _index_scores_kernel(
    Q, K_, W, S, LO, HI_, t0, t1, Tk, NCOLS,
    sq_b, sq_t, sk_b, sk_t, sw_b, sw_t, ss_b, ss_r,
    HI: tl.constexpr, HI_P2: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    # rows of the [BLOCK_M * HI_P2, DI] query matrix: token r // HI_P2, index head r % HI_P2
    r = tl.arange(0, BLOCK_M * HI_P2)
    tok = t0 + pid_m * BLOCK_M + r // HI_P2
    head = r % HI_P2
    rmask = (tok < t1) & (head < HI)
    d = tl.arange(0, BLOCK_DI)
    q = tl.load(Q + b * sq_b + tok.to(tl.int64)[:, None] * sq_t + head[:, None] * DI + d[None, :],
                mask=rmask[:, None] & (d[None, :] < DI), other=0.0)  # [BLOCK_M * HI_P2, BLOCK_DI]
    w = tl.load(W + b * sw_b + tok.to(tl.int64) * sw_t + head, mask=rmask, other=0.0)
    rows = t0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_row = rows < t1
    row_lo = tl.load(LO + rows, mask=valid_row, other=0)
    row_hi = tl.load(HI_ + rows, mask=valid_row, other=0)
    lo = tl.min(tl.where(valid_row, row_lo, 2**30))
    hi = tl.max(row_hi)
    out = S + b * ss_b + (rows - t0).to(tl.int64)[:, None] * ss_r
    for j in tl.static_range(N_TILES):
        n0 = (pid_n * N_TILES + j) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        smask = valid_row[:, None] & (cols[None, :] < NCOLS)
        if (n0 < hi) & (n0 + BLOCK_N > lo):
            kt = tl.load(K_ + b * sk_b + cols.to(tl.int64)[:, None] * sk_t + d[None, :],
                         mask=(cols[:, None] < Tk) & (d[None, :] < DI), other=0.0)  # [BLOCK_N, BLOCK_DI]
            dots = tl.dot(q, tl.trans(kt), input_precision=PRECISION)  # [BLOCK_M * HI_P2, BLOCK_N]
            contrib = tl.maximum(dots, 0.0) * w[:, None]
            scores = tl.sum(tl.reshape(contrib, (BLOCK_M, HI_P2, BLOCK_N)), 1)  # [BLOCK_M, BLOCK_N]
            seen = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
            tl.store(out + cols[None, :], tl.where(seen, scores, float("-inf")), mask=smask)
        else:
            # a plain top-k over the chunk's rows may read these: they must rank below every visible key
            tl.store(out + cols[None, :], tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32), mask=smask)


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


def indexer_scores_chunk(q, k, w, lo, hi, t0, t1, scores, block_m=32, block_n=128, n_tiles=4, num_warps=8):
    """Fill scores[:, :t1 - t0, :] with the index scores of query rows t0:t1 (only their visible keys); scores may
    be narrower than Tk (the chunk's causal width), never wider."""
    B, _, HI, DI = q.shape
    Tk = k.shape[1]
    hi_p2 = triton.next_power_of_2(HI)
    block_m = max(1, block_m * 4 // hi_p2) if hi_p2 > 4 else block_m
    key_end = Tk - q.shape[1] + t1  # causal: the chunk sees no key past its last row
    grid = (triton.cdiv(t1 - t0, block_m), triton.cdiv(key_end, block_n * n_tiles), B)
    _index_scores_kernel[grid](
        q, k, w, scores, lo, hi, t0, t1, Tk, scores.shape[-1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), w.stride(0), w.stride(1), scores.stride(0),
        scores.stride(1),
        HI=HI, HI_P2=hi_p2, DI=DI, BLOCK_DI=max(16, triton.next_power_of_2(DI)), BLOCK_M=block_m, BLOCK_N=block_n,
        N_TILES=n_tiles, PRECISION="tf32x3" if q.dtype == torch.float32 else None, num_warps=num_warps,
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
    vals, idx = torch.topk(scores[:, : t1 - t0, :key_end], kk, dim=-1, sorted=True)  # [B, c, kk]
    idx = (idx - lo[t0:t1, None]).masked_fill_(vals == float("-inf"), -1)
    out[:, t0:t1, :kk] = idx
    out[:, t0:t1, kk:] = -1


def indexer_topk_triton(q_idx, k_idx, weights, topk, *, cu_seqlens=None, score_budget=None, select="torch"):
    """Backend entry point with the op's signature (minus ``backend``): int64 indices [B, Tq, topk].

    ``select``: ``"torch"`` (torch.topk on the chunk's scores; the default, since it measured faster on an H100)
    or ``"radix"`` / ``"radix11"`` (the radix-select kernel with 8- or 11-bit digits).
    """
    if select not in ("torch", "radix", "radix11"):
        raise ValueError(f"indexer_topk_triton: select must be 'torch', 'radix' or 'radix11', got {select!r}")
    B, Tq = q_idx.shape[:2]
    Tk = k_idx.shape[1]
    q = q_idx.contiguous()
    k = k_idx.to(q.dtype).contiguous()
    w = weights.float().contiguous()
    out = torch.empty(B, Tq, topk, device=q.device, dtype=torch.int64)
    if B * Tq == 0:
        return out
    lo, hi = _visible_range(Tq, Tk, cu_seqlens, q.device)
    budget = SCORE_BUDGET if score_budget is None else score_budget
    chunk = max(1, min(Tq, budget // max(1, B * Tk)))
    buf = torch.empty(B * chunk * Tk, device=q.device, dtype=torch.float32)
    for t0 in range(0, Tq, chunk):
        t1 = min(Tq, t0 + chunk)
        # a contiguous [B, rows, causal width] block: torch.topk on a strided slice would copy it first
        scores = buf[: B * (t1 - t0) * (Tk - Tq + t1)].view(B, t1 - t0, Tk - Tq + t1)
        indexer_scores_chunk(q, k, w, lo, hi, t0, t1, scores)
        if select == "torch":
            torch_topk_chunk(scores, lo, t0, t1, Tk - Tq + t1, out, topk)
        else:
            radix_topk_chunk(scores, lo, hi, t0, t1, out, topk, digit_bits=8 if select == "radix" else 11)
    return out
