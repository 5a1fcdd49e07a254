"""Question: how fast is the Triton sparse attention (DSA's attention half, arXiv 2512.02556), forward and backward?

Effective FLOPs (the issue's definition): forward 4 * T * topk * HQ * D, backward 2.5x that. Random distinct
causal indices (one from each of topk strata), 16 query heads x 128, 1 or 4 KV heads, topk 2048, bf16. Sweeps a few
(BLOCK_K, num_warps, num_stages) configs per pass; first checks the kernels against the reference at T = 4096.
`--index-order`: the same index sets in position order and shuffled (top-k returns them by score).
`--local 0 0.5 0.9`: index rows that hold the query's most recent keys in that fraction of their slots, as trained
indexers' picks overlap between neighbouring queries (the benchmark's random rows share almost nothing).
`--mla`: MLA's absorbed latent shapes, split head dims + values gathered from the keys' rows against the padded kernel.
`--head-dim 64 --hkv 1`: other shapes (the 350M hybrid's DSA layers: 16 heads x 64, one KV head); the backward then
also sweeps 64-key blocks, which narrow heads leave room for.
Baseline in the same run: cuDNN SDPA dense causal attention at the same T (forward).

    python benchmarks/bench_sparse_attention.py [--T 16384 65536]
    python benchmarks/bench_sparse_attention.py --T 32768 --head-dim 64 --hkv 1
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.nn.functional as F
from common import bench_ms, guarded, print_table, random_causal_indices, row, save
from torch.nn.attention import SDPBackend, sdpa_kernel

from hybrid_lm import ops
from hybrid_lm.ops.triton import sparse_attention as sa

HQ, D, TOPK = 16, 128, 2048
FWD_CONFIGS = [(32, 4, 2), (64, 8, 2), (64, 8, 3), (32, 4, 3)]
BWD_CONFIGS = [(32, 8, 2), (32, 8, 1), (32, 4, 1), (16, 4, 1), (32, 4, 2)]
NARROW_BWD_CONFIGS = [(64, 4, 1), (64, 8, 1), (64, 4, 2)]  # also swept at head dims <= 64


def inputs(T, hkv, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, HQ, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, T, hkv, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, T, hkv, D, device="cuda", generator=g, dtype=torch.bfloat16)
    return q, k, v, random_causal_indices(T, TOPK, seed=seed).int().contiguous()


def check(rows, T=4096):
    for hkv in (1, 4):
        q, k, v, idx = inputs(T, hkv, seed=1)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = ops.sparse_attention(*leaves, idx, backend="triton")
        refs = [x.float().requires_grad_() for x in (q, k, v)]
        ro = ops.sparse_attention(*refs, idx, backend="reference")
        do = torch.randn_like(ro)
        (o.float() * do).sum().backward()
        (ro * do).sum().backward()
        err = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
        errs = {"o": err(o, ro), **{f"d{n}": err(a.grad, b.grad) for n, a, b in zip("qkv", leaves, refs)}}
        print(f"check T={T} hkv={hkv}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
        rows.append(row("sparse_attention_check", "triton", T, hkv=hkv, **{f"rel_err_{n}": e for n, e in errs.items()}))


def run(T, hkv, rows):
    q, k, v, idx = inputs(T, hkv)
    scale = D ** -0.5
    flops = 4.0 * T * TOPK * HQ * D
    best_fwd = None
    for cfg in FWD_CONFIGS:
        ms = bench_ms(lambda: sa.sparse_attention_fwd(q, k, v, idx, None, scale, config=cfg))
        rows.append(row("sparse_attention_fwd", f"triton{cfg}", T, fwd_ms=ms, tflops=flops / ms / 1e9, hkv=hkv,
                        head_dim=D))
        best_fwd = ms if best_fwd is None else min(best_fwd, ms)
    o, lse = sa.sparse_attention_fwd(q, k, v, idx, None, scale)
    do = torch.randn_like(o)
    for cfg in BWD_CONFIGS + (NARROW_BWD_CONFIGS if D <= 64 else []):
        ms = bench_ms(lambda: sa.sparse_attention_bwd(q, k, v, idx, None, o, lse, do, None, scale, config=cfg))
        rows.append(row("sparse_attention_bwd", f"triton{cfg}", T, fwdbwd_ms=best_fwd + ms,
                        tflops=3.5 * flops / (best_fwd + ms) / 1e9, hkv=hkv, bwd_ms=ms,
                        head_dim=D))
    torch.cuda.empty_cache()


def dense_baseline(T, rows):
    q, k, v = (torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    rows.append(row("dense_attention_fwd", "cudnn-sdpa", T, fwd_ms=ms, tflops=2.0 * T * T * HQ * D / ms / 1e9))


def fwd_bwd_ms(q, k, v, idx, scale) -> tuple[float, float]:
    """Forward and backward ms of the sparse kernels (default configs) on these index rows."""
    o, lse = sa.sparse_attention_fwd(q, k, v, idx, None, scale)
    do = torch.randn_like(o)
    return (bench_ms(lambda: sa.sparse_attention_fwd(q, k, v, idx, None, scale)),
            bench_ms(lambda: sa.sparse_attention_bwd(q, k, v, idx, None, o, lse, do, None, scale)))


def index_order(T, rows):
    """Same index sets, two orders within each row: by position (as generated) and shuffled (as top-k returns them,
    by score). Only the order of a row's gathers and atomic adds changes, not the work."""
    q, k, v, idx = inputs(T, 1)
    g = torch.Generator(device="cuda").manual_seed(1)
    shuffled = idx.gather(-1, torch.rand(idx.shape, device="cuda", generator=g).argsort(-1).to(idx.device))
    shuffled = shuffled.to(torch.int32).contiguous()
    scale = D ** -0.5
    for name, ind in (("position-order", idx), ("shuffled", shuffled)):
        f_ms, b_ms = fwd_bwd_ms(q, k, v, ind, scale)
        rows.append(row("sparse_attention_index_order", name, T, fwd_ms=f_ms, bwd_ms=b_ms, fwdbwd_ms=f_ms + b_ms, hkv=1))
    ms = bench_ms(lambda: shuffled.sort(-1))  # what sorting the rows back would cost
    rows.append(row("sparse_attention_index_order", "torch.sort(rows)", T, fwd_ms=ms, hkv=1))


def locality(T, fractions, rows):
    """Index rows whose last `local` * topk slots are the query's most recent keys (neighbouring queries share them,
    as a trained indexer's picks overlap; the rest stratified random), one KV head, the default configs. Sharing
    puts neighbouring queries' gathers into the same rows (cache hits) and their dk / dv atomics onto the same
    addresses (contention)."""
    q, k, v, _ = inputs(T, 1)
    scale = D ** -0.5
    flops = 4.0 * T * TOPK * HQ * D
    for local in fractions:
        idx = random_causal_indices(T, TOPK, local=local).int().contiguous()
        f_ms, b_ms = fwd_bwd_ms(q, k, v, idx, scale)
        rows.append(row("sparse_attention_locality", f"local={local:g}", T, fwd_ms=f_ms, bwd_ms=b_ms,
                        fwdbwd_ms=f_ms + b_ms, tflops=flops / f_ms / 1e9, hkv=1, head_dim=D, local=local))
        print(rows[-1], flush=True)
        del idx
    torch.cuda.empty_cache()


MLA_SHAPES = [(12, 288, 256), (16, 576, 512)]  # (heads, latent + rotary key dims, latent value dims): the zoo's
# deepseek-v32-125m and DeepSeek-V3.2's 576/512 latent with 16 heads


def mla(T, rows):
    """MLA's absorbed form (one latent KV head; values = the keys' first DV dims), forward and backward: head dims
    split into a power-of-2 block + tail with the values gathered once from the keys' rows (sa.SPLIT_HEAD_DIM = True,
    the default), against one padded block with the values gathered separately (the previous kernels), same run."""
    for HQ_, D_, DV_ in MLA_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, T, HQ_, D_, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(1, T, 1, D_, device="cuda", generator=g, dtype=torch.bfloat16)
        v = k[..., :DV_]
        idx = random_causal_indices(T, TOPK).int().contiguous()
        scale = D_ ** -0.5
        flops = 2.0 * T * TOPK * HQ_ * (D_ + DV_)
        for split in (True, False):
            with mock.patch.object(sa, "SPLIT_HEAD_DIM", split):
                f_ms, b_ms = fwd_bwd_ms(q, k, v, idx, scale)
            rows.append(row("sparse_attention_mla", "split+shared-values" if split else "padded+separate-values", T,
                            fwd_ms=f_ms, bwd_ms=b_ms, fwdbwd_ms=f_ms + b_ms, tflops=flops / f_ms / 1e9, heads=HQ_,
                            d_qk=D_, d_v=DV_))
            print(rows[-1], flush=True)
        torch.cuda.empty_cache()


def main():
    global D
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--index-order", action="store_true",
                    help="only compare position-ordered with shuffled index rows (and the cost of sorting them)")
    ap.add_argument("--mla", action="store_true", help="only MLA's latent shapes: split head dims + shared values "
                                                        "against padded + separate (forward TFLOPS: 2 T topk H (D + DV))")
    ap.add_argument("--head-dim", type=int, default=D, help=f"query/key/value head dim (default {D})")
    ap.add_argument("--hkv", type=int, nargs="+", default=[1, 4], help="KV heads of the rows (default 1 4)")
    ap.add_argument("--local", type=float, nargs="+", metavar="FRACTION",
                    help="only compare index rows whose last FRACTION x topk slots are the most recent keys, e.g. "
                         "0 0.5 0.9 (forward TFLOPS, backward ms; one KV head, default configs)")
    args = ap.parse_args()
    D = args.head_dim
    rows = []
    if args.mla:
        for T in args.T:
            guarded(rows, "sparse_attention_mla", lambda: mla(T, rows))
        save(rows, "sparse_attention_mla")
        print_table(rows, cols=("op", "impl", "T", "heads", "d_qk", "fwd_ms", "bwd_ms", "fwdbwd_ms", "tflops"))
        return
    if args.local:
        for T in args.T:
            guarded(rows, "dense_attention_fwd", lambda: dense_baseline(T, rows))
            guarded(rows, "sparse_attention_locality", lambda: locality(T, args.local, rows))
        save(rows, "sparse_attention_locality" if D == 128 else f"sparse_attention_locality-d{D}")
        print_table(rows, cols=("op", "impl", "T", "fwd_ms", "bwd_ms", "fwdbwd_ms", "tflops"))
        return
    if args.index_order:
        for T in args.T:
            guarded(rows, "sparse_attention_index_order", lambda: index_order(T, rows))
        save(rows, "sparse_attention_index_order")
        print_table(rows, cols=("op", "impl", "T", "fwd_ms", "bwd_ms", "fwdbwd_ms"))
        return
    guarded(rows, "sparse_attention_check", lambda: check(rows))
    for T in args.T:
        guarded(rows, "dense_attention_fwd", lambda: dense_baseline(T, rows))
        for hkv in args.hkv:
            guarded(rows, "sparse_attention", lambda: run(T, hkv, rows))
    save(rows, "sparse_attention" if D == 128 else f"sparse_attention-d{D}")
    print_table([r for r in rows if r["op"] != "sparse_attention_check"],
                cols=("op", "impl", "T", "hkv", "fwd_ms", "bwd_ms", "fwdbwd_ms", "tflops"))


if __name__ == "__main__":
    main()
