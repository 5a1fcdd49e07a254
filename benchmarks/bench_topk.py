"""Question: which top-k selection is fastest for the indexer (DSA, arXiv 2512.02556): torch.topk on the full
scores, the radix-select kernel, or the threshold selection (sampled threshold, streaming candidate pass, top-k
of the candidates, no score block)?

Scores: the Triton index-score kernel's output for the last R query rows of a T-token sequence (4 index heads x
64, bf16 inputs, fp32 scores), i.e. the longest rows. torch.topk gets the same rows with future keys set to
-inf; both return the topk = 2048 best keys sorted by score. Then the whole Triton indexer top-k (scores and
selection) with each selection, against the chunked PyTorch reference on the GPU; the threshold selection's
rows are checked against torch.topk's (same index sets) and its exact-fallback rows counted.

`--candidates`: the candidate pass alone over its configs (BLOCK_M, BLOCK_N, num_warps) with and without ranking
exact ties in the kernel, beside a floor kernel that computes the same scores and only counts the keys at or above
the threshold (no compaction, no stores): the gap is what keeping candidates in position order costs.

    python benchmarks/bench_topk.py [--T 16384 65536] [--rows 4096] [--stages | --candidates]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from common import bench_ms, guarded, print_table, row, save

from hybrid_lm.ops.indexer import _topk_reference
from hybrid_lm.ops.triton import indexer_topk as it

HI, DI, TOPK = 4, 64, 2048


def inputs(T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, HI, DI, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, T, DI, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(1, T, HI, device="cuda", generator=g)
    return q, k, w


def selection(T, R, rows):
    q, k, w = inputs(T)
    lo, hi = it._visible_range(T, T, None, q.device)
    t0, t1 = T - R, T
    scores = torch.empty(1, R, T, device="cuda", dtype=torch.float32)
    ms_scores = bench_ms(lambda: it.indexer_scores_chunk(q, k, w, lo, hi, t0, t1, scores))
    index_flops = 2.0 * HI * DI * R * (T - R / 2)
    rows.append(row("index_scores", "triton", T, fwd_ms=ms_scores, tflops=index_flops / ms_scores / 1e9, rows=R))
    future = torch.arange(T, device="cuda")[None, :] >= hi[t0:t1, None]
    masked = scores.masked_fill(future[None], float("-inf"))
    ref = torch.topk(masked, TOPK, dim=-1).values
    for bits in (8, 11):
        out = torch.empty(1, T, TOPK, device="cuda", dtype=torch.int64)
        ms = bench_ms(lambda: it.radix_topk_chunk(scores, lo, hi, t0, t1, out, TOPK, digit_bits=bits))
        err = (masked.gather(-1, out[:, t0:t1]) - ref).abs().max().item()
        print(f"T={T}: radix ({bits}-bit digits) vs torch.topk values max abs diff {err:.2e}")
        rows.append(row("topk_selection", f"triton-radix{bits}(sorted)", T, fwd_ms=ms, rows=R, max_abs_diff=err))
    for impl, srt in (("torch.topk(sorted)", True), ("torch.topk(unsorted)", False)):
        ms = bench_ms(lambda: torch.topk(masked, TOPK, dim=-1, sorted=srt))
        rows.append(row("topk_selection", impl, T, fwd_ms=ms, rows=R))


def whole(T, rows):
    q, k, w = inputs(T)
    results = {}
    for select in ("threshold", "torch", "radix") if T <= 16384 else ("threshold", "torch"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        it.STATS["exact_rows"] = 0
        results[select] = it.indexer_topk_triton(q, k, w, TOPK, select=select)
        extra = {"exact_rows": it.STATS["exact_rows"]} if select == "threshold" else {}
        ms = bench_ms(lambda: it.indexer_topk_triton(q, k, w, TOPK, select=select))
        mem = torch.cuda.max_memory_allocated() / 2**30
        if select != "threshold":
            same = (results[select] == results["threshold"]).all(-1).float().mean().item()
            extra["rows_equal_threshold"] = same
            print(f"T={T}: {select} and threshold select the same keys in {same:.4%} of rows")
            del results[select]
        rows.append(row("indexer_topk", f"triton-scores+{select}", T, fwd_ms=ms, tflops=HI * DI * T * T / ms / 1e9,
                        peak_mem_gb=mem, **extra))
    if T <= 16384:
        ms_ref = bench_ms(lambda: _topk_reference(q, k, w, TOPK), warmup=5, rep=30)
        rows.append(row("indexer_topk", "reference(torch, GPU)", T, fwd_ms=ms_ref))


def stages(T, R, rows):
    """The threshold selection's steps on the last R query rows, timed one by one."""
    q, k, w = inputs(T)
    lo, hi = it._visible_range(T, T, None, q.device)
    t0, t1 = T - R, T
    bufs = it.threshold_buffers(R, T, TOPK, q.device)
    out = torch.empty(1, T, TOPK, device="cuda", dtype=torch.int64)
    tau = it.row_thresholds(q, k, w, lo, hi, t0, t1, TOPK, bufs["samples"])
    cand = it.keep_candidates(q, k, w, tau, lo, hi, t0, t1, TOPK, bufs)
    steps = {
        "thresholds (sampled scores + torch.topk)": lambda: it.row_thresholds(q, k, w, lo, hi, t0, t1, TOPK,
                                                                             bufs["samples"]),
        f"candidate pass (ties: {it.RANK_TIES})": lambda: it.keep_candidates(q, k, w, tau, lo, hi, t0, t1, TOPK, bufs),
        "candidate pass (ties: ranked in every block)": lambda: it.keep_candidates(q, k, w, tau, lo, hi, t0, t1,
                                                                                  TOPK, bufs, rank_ties=True),
        "k-th candidate (torch.topk) + select": lambda: it.select_candidates(*cand[:3], t0, out, TOPK, kth="torch"),
        "whole chunk": lambda: it.threshold_topk_chunk(q, k, w, lo, hi, t0, t1, out, TOPK, bufs),
        "k-th candidate (in-kernel search) + select": lambda: it.select_candidates(*cand[:3], t0, out, TOPK,
                                                                                   kth="search"),
    }
    for name, fn in steps.items():
        rows.append(row("threshold_stage", name, T, fwd_ms=bench_ms(fn), rows=R))


@triton.jit
def _count_above_kernel(
    Q, K_, W, TAU, LO, HI_, CNT, t0, t1, Tk, sq_b, sq_t, sk_b, sk_t, sw_b, sw_t,
    HI: tl.constexpr, HI_P2: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """The candidate pass's floor: the same score tiles over the same keys, counting those at or above tau."""
    pid_m = tl.program_id(0)
    row0 = t0 + pid_m * BLOCK_M
    q, w = it._query_block(Q, W, 0, row0, t1, sq_b, sq_t, sw_b, sw_t, HI, HI_P2, DI, BLOCK_DI, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    valid_row, row_lo, row_hi, lo, hi = it._row_ranges(LO, HI_, rows, t1)
    tau = tl.load(TAU + (rows - t0), mask=valid_row, other=float("inf"))
    total = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        scores = it._score_tile(q, w, K_, keys, sk_t, Tk, DI, BLOCK_DI, BLOCK_M, HI_P2, BLOCK_N, PRECISION)
        seen = (keys[None, :] >= row_lo[:, None]) & (keys[None, :] < row_hi[:, None])
        total += tl.sum((seen & (scores >= tau[:, None])).to(tl.int32), 1)
    tl.store(CNT + (rows - t0), total, mask=valid_row)


CANDIDATE_CONFIGS = [(32, 64, 8), (32, 128, 8), (64, 64, 8), (16, 64, 4), (32, 64, 4), (64, 128, 8)]


def candidates(T, R, rows):
    """The candidate pass on the last R rows per config and tie mode, its floor, and the counts each one gives."""
    q, k, w = inputs(T)
    lo, hi = it._visible_range(T, T, None, q.device)
    t0, t1 = T - R, T
    bufs = it.threshold_buffers(R, T, TOPK, q.device)
    tau = it.row_thresholds(q, k, w, lo, hi, t0, t1, TOPK, bufs["samples"]).contiguous()
    flops = 2.0 * HI * DI * R * (T - R / 2)
    ref = None
    slots = torch.arange(bufs["offsets"].numel() // R, device="cuda")
    runs = [(cfg, mode) for cfg in CANDIDATE_CONFIGS for mode in (True, False)]
    runs += [(it.CANDIDATE_CONFIG, "grouped")]
    for cfg, mode in runs:
        fn = lambda: it.keep_candidates(q, k, w, tau, lo, hi, t0, t1, TOPK, bufs, config=cfg, rank_ties=mode)
        _, cand_i, count, total = fn()
        # what a row keeps: its counts and its filled slots (the rest of the buffer is stale)
        got = (count.clone(), total.clone(), torch.where(slots < count[..., None].clamp(max=slots.numel()), cand_i, -1))
        ref = ref or got
        same = all(torch.equal(a, b) for a, b in zip(got, ref))
        ms = bench_ms(fn)
        name = {True: "rank-ties", False: "keep-ties"}.get(mode, mode)
        rows.append(row("candidate_pass", f"{cfg}-{name}", T, fwd_ms=ms, tflops=flops / ms / 1e9, rows=R,
                        same_as_first=same))
        print(rows[-1], flush=True)
    count = torch.empty(R, device="cuda", dtype=torch.int32)
    for bm, bn, nw in CANDIDATE_CONFIGS[:3]:
        args = it._tile_args(q, bm)
        fn = lambda: _count_above_kernel[(triton.cdiv(R, args["BLOCK_M"]),)](
            q, k, w, tau, lo, hi, count, t0, t1, T, q.stride(0), q.stride(1), k.stride(0), k.stride(1), w.stride(0),
            w.stride(1), **args, BLOCK_N=bn, num_warps=nw)
        ms = bench_ms(fn)
        rows.append(row("candidate_pass", f"floor-count-only{(bm, bn, nw)}", T, fwd_ms=ms, tflops=flops / ms / 1e9,
                        rows=R, same_as_first=bool(torch.equal(count[None], ref[1]))))
        print(rows[-1], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--stages", action="store_true", help="only time the threshold selection's steps")
    ap.add_argument("--candidates", action="store_true", help="only the candidate pass: configs, tie modes, floor")
    args = ap.parse_args()
    rows = []
    if args.candidates:
        for T in args.T:
            guarded(rows, "candidate_pass", lambda: candidates(T, min(args.rows, T), rows))
        save(rows, "topk-candidates")
        print_table(rows, cols=("op", "impl", "T", "rows", "fwd_ms", "tflops", "same_as_first"))
        return
    if args.stages:
        for T in args.T:
            guarded(rows, "threshold_stage", lambda: stages(T, min(args.rows, T), rows))
        save(rows, "topk-stages")
        print_table(rows, cols=("op", "impl", "T", "rows", "fwd_ms"))
        return
    for T in args.T:
        guarded(rows, "topk_selection", lambda: selection(T, min(args.rows, T), rows))
        torch.cuda.empty_cache()
        guarded(rows, "indexer_topk", lambda: whole(T, rows))
        torch.cuda.empty_cache()
    save(rows, "topk")
    print_table(rows, cols=("op", "impl", "T", "rows", "fwd_ms", "tflops"))


if __name__ == "__main__":
    main()
