"""Question: which top-k selection is fastest for the indexer (DSA, arXiv 2512.02556): torch.topk on the full
scores, the radix-select kernel, or the threshold selection (sampled threshold, streaming candidate pass, top-k
of the candidates, no score block)?

Scores: the Triton index-score kernel's output for the last R query rows of a T-token sequence (4 index heads x
64, bf16 inputs, fp32 scores), i.e. the longest rows. torch.topk gets the same rows with future keys set to
-inf; both return the topk = 2048 best keys sorted by score. Then the whole Triton indexer top-k (scores and
selection) with each selection, against the chunked PyTorch reference on the GPU; the threshold selection's
rows are checked against torch.topk's (same index sets) and its exact-fallback rows counted.

    python benchmarks/bench_topk.py [--T 16384 65536] [--rows 4096] [--stages]
"""

from __future__ import annotations

import argparse

import torch
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
        "candidate pass": lambda: it.keep_candidates(q, k, w, tau, lo, hi, t0, t1, TOPK, bufs),
        "k-th candidate (torch.topk) + select": lambda: it.select_candidates(*cand[:3], t0, out, TOPK, kth="torch"),
        "whole chunk": lambda: it.threshold_topk_chunk(q, k, w, lo, hi, t0, t1, out, TOPK, bufs),
        "k-th candidate (in-kernel search) + select": lambda: it.select_candidates(*cand[:3], t0, out, TOPK,
                                                                                   kth="search"),
    }
    for name, fn in steps.items():
        rows.append(row("threshold_stage", name, T, fwd_ms=bench_ms(fn), rows=R))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--stages", action="store_true", help="only time the threshold selection's steps")
    args = ap.parse_args()
    rows = []
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
