"""Question: what do the lightning indexer's KL losses cost, forward + backward, Triton kernel vs reference?

DSA's two training stages (arXiv 2512.02556): the dense warm-up's KL over every causal key, and the sparse stage's
KL over the top-k selected keys (p from the sparse attention's saved log-sum-exp). Batch 1, 16 heads x 128 with
1 KV head (V3.2's MQA), 4 index heads x 64, topk 2048, bf16 inputs. The reference (hybrid_lm/ops/dsa_loss.py,
blockwise PyTorch) runs only where it fits in the time budget. The dense cuDNN attention forward + backward of
the same shape is the in-run yardstick. The sparse stage's Triton kernel is timed both ways: two sweeps (loss in the
forward, gradients in the backward) and one sweep (gradients computed in the forward; indexer_kl.SPARSE_ONE_SWEEP).
FLOPs (forward): dense warm-up 2 T^2 (H D + HI DI) (causal half of q.k for every head plus the index scores; the
lse sweep adds 2 T^2 H D / 2 more, not counted); sparse 2 T topk (H D + HI DI). Backward counted as 2x forward.

    python benchmarks/bench_indexer_kl.py [--T 4096 16384 65536] [--ref-max-T 16384]
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.nn.functional as F
from common import bench_ms, guarded, peak_mem_gb, print_table, row, save
from torch.nn.attention import SDPBackend, sdpa_kernel

from hybrid_lm import ops
from hybrid_lm.ops.triton import indexer_kl as kl_kernels

H, HKV, D, HI, DI, TOPK = 16, 1, 128, 4, 64, 2048


def inputs(T):
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q, k = torch.randn(1, T, H, D, **bf), torch.randn(1, T, HKV, D, **bf)
    q_idx = torch.randn(1, T, HI, DI, **bf).requires_grad_()
    k_idx = torch.randn(1, T, DI, **bf).requires_grad_()
    w = (torch.randn(1, T, HI, **bf) * DI ** -0.5).requires_grad_()
    return q, k, q_idx, k_idx, w


def measure(rows, op, impl, T, fn, flops):
    with torch.no_grad():
        f_ms = bench_ms(fn)
    b_ms = bench_ms(lambda: fn().backward())
    mem = peak_mem_gb(lambda: fn().backward())
    rows.append(row(op, impl, T, fwd_ms=f_ms, fwdbwd_ms=b_ms, tflops=3 * flops / b_ms / 1e9, peak_mem_gb=mem))
    print(rows[-1], flush=True)


def dense_kl(T, rows, backends):
    q, k, q_idx, k_idx, w = inputs(T)
    flops = 2.0 * T * T / 2 * (H * D + HI * DI) * 2
    for b in backends:
        measure(rows, "indexer_kl_dense", b, T, lambda: ops.indexer_kl_dense(q, k, q_idx, k_idx, w, backend=b), flops)


def sparse_kl(T, rows, backends):
    q, k, q_idx, k_idx, w = inputs(T)
    with torch.no_grad():
        idx = ops.lightning_indexer_topk(q_idx, k_idx, w, TOPK)
        _, lse = ops.sparse_attention(q, k, k, idx, return_lse=True)
    flops = 2.0 * T * TOPK * (H * D + HI * DI)
    for b in backends:
        measure(rows, "indexer_kl_sparse", b, T,
                lambda: ops.indexer_kl_sparse(q, k, q_idx, k_idx, w, idx, attn_lse=lse, backend=b), flops)
    if "triton" in backends:  # the other way with gradients (indexer_kl.SPARSE_ONE_SWEEP) in the same run
        other = not kl_kernels.SPARSE_ONE_SWEEP
        with mock.patch.object(kl_kernels, "SPARSE_ONE_SWEEP", other):
            measure(rows, "indexer_kl_sparse", "triton-one-sweep" if other else "triton-two-sweeps", T,
                    lambda: ops.indexer_kl_sparse(q, k, q_idx, k_idx, w, idx, attn_lse=lse, backend="triton"), flops)


def dense_attention(T, rows):
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def fn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).float().square().mean()

    measure(rows, "dense_attention", "cudnn-sdpa", T, fn, 2.0 * T * T * H * D)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--ref-max-T", type=int, default=16384, help="largest T at which the reference runs")
    ap.add_argument("--name", default="indexer_kl")
    args = ap.parse_args()
    rows = []
    for T in args.T:
        backends = ["triton"] + (["reference"] if T <= args.ref_max_T else [])
        guarded(rows, "dense_attention", lambda: dense_attention(T, rows))
        guarded(rows, "indexer_kl_sparse", lambda: sparse_kl(T, rows, backends))
        guarded(rows, "indexer_kl_dense", lambda: dense_kl(T, rows, backends[:1] if T > 4096 else backends))
        torch.cuda.empty_cache()
        save(rows, args.name)
    print_table(rows)


if __name__ == "__main__":
    main()
