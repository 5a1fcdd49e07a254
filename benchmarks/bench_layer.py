"""Question: what does one attention-type layer cost per mixer, forward and forward + backward, on one GPU?

Per layer, batch 1, 16 heads x 128, bf16, causal, T in {4k, 16k, 64k, 128k}:
- dense attention: flash-attn-4 (if installed) and cuDNN SDPA (the baselines, same run);
- DSA (arXiv 2512.02556): Triton indexer top-k (4 index heads x 64, topk 2048, no gradient) + Triton sparse
  attention, 1 and 4 KV heads; forward + backward differentiates the sparse attention (the indexer's own KL loss
  is not included); `dsa_train` adds the sparse stage's indexer KL (Triton, forward + backward into the
  indexer's q/k/weights), i.e. everything a DSA layer's attention does in a sparse-stage training step;
- Gated DeltaNet: fla's chunk_gated_delta_rule (q/k L2-normalised in the kernel).
TFLOPS: dense counts the causal half (2 T^2 H D forward), DSA the issue's 4 T topk H D; backward = 2.5x forward.

    python benchmarks/bench_layer.py [--T 4096 16384 65536 131072] [--skip fa4 gdn]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import bench_ms, guarded, peak_mem_gb, print_table, row, save
from torch.nn.attention import SDPBackend, sdpa_kernel

from hybrid_lm import ops
from hybrid_lm.ops.triton.indexer_topk import indexer_topk_triton

H, D, HI, DI, TOPK = 16, 128, 4, 64, 2048


def measure(rows, op, impl, T, fwd, fwdbwd, flops, **extra):
    """fwd() runs without autograd; fwdbwd() runs forward and backward; flops = forward FLOPs."""
    with torch.no_grad():
        f_ms = bench_ms(fwd)
    b_ms = bench_ms(fwdbwd)
    mem = peak_mem_gb(fwdbwd)
    rows.append(row(op, impl, T, fwd_ms=f_ms, fwdbwd_ms=b_ms, tflops=None if flops is None else 3.5 * flops / b_ms / 1e9,
                    peak_mem_gb=mem, fwd_tflops=None if flops is None else flops / f_ms / 1e9, **extra))
    print(rows[-1], flush=True)


def randn(*shape, grad=True):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)


def dense_cudnn(T, rows):
    q, k, v = (randn(1, H, T, D) for _ in range(3))  # [B, H, T, D]
    do = torch.randn_like(q)

    def fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    measure(rows, "dense_attention", "cudnn-sdpa", T, fwd, lambda: fwd().backward(do), 2.0 * T * T * H * D)


def dense_fa4(T, rows):
    from flash_attn.cute import flash_attn_func

    q, k, v = (randn(1, T, H, D) for _ in range(3))
    do = torch.randn_like(q)

    def fwd():
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out

    measure(rows, "dense_attention", "flash-attn-4", T, fwd, lambda: fwd().backward(do), 2.0 * T * T * H * D)


def dsa(T, hkv, rows):
    q, k, v = randn(1, T, H, D), randn(1, T, hkv, D), randn(1, T, hkv, D)
    q_idx, k_idx = randn(1, T, HI, DI, grad=False), randn(1, T, DI, grad=False)
    w = torch.randn(1, T, HI, device="cuda")
    do = torch.randn_like(q)

    def fwd():
        idx = ops.lightning_indexer_topk(q_idx, k_idx, w, TOPK, backend="triton")
        return ops.sparse_attention(q, k, v, idx, backend="triton")

    flops = 4.0 * T * TOPK * H * D
    measure(rows, "dsa", f"triton-hkv{hkv}", T, fwd, lambda: fwd().backward(do), flops, hkv=hkv)
    idx = ops.lightning_indexer_topk(q_idx, k_idx, w, TOPK, backend="triton")
    ms = bench_ms(lambda: ops.lightning_indexer_topk(q_idx, k_idx, w, TOPK, backend="triton"))
    rows.append(row("dsa_indexer_topk", "triton", T, fwd_ms=ms, hkv=hkv))
    if hkv == 1:  # the previous default, full scores + torch.topk, in the same run
        ms = bench_ms(lambda: indexer_topk_triton(q_idx, k_idx, w, TOPK, select="torch"))
        rows.append(row("dsa_indexer_topk", "triton-torch.topk", T, fwd_ms=ms, hkv=hkv))
    measure(rows, "dsa_sparse_attention", f"triton-hkv{hkv}", T, lambda: ops.sparse_attention(q, k, v, idx),
            lambda: ops.sparse_attention(q, k, v, idx).backward(do), flops, hkv=hkv)
    if hkv == 1:  # the same index sets in score order (random with respect to position), as top-k returned before
        g = torch.Generator(device="cuda").manual_seed(1)
        shuffled = idx.gather(-1, torch.rand(idx.shape, device="cuda", generator=g).argsort(-1))
        measure(rows, "dsa_sparse_attention", f"triton-hkv{hkv}-score-order", T,
                lambda: ops.sparse_attention(q, k, v, shuffled),
                lambda: ops.sparse_attention(q, k, v, shuffled).backward(do), flops, hkv=hkv)
        del shuffled
    qi, ki, wi = (x.detach().clone().requires_grad_() for x in (q_idx, k_idx, w))

    def train_step():  # sparse stage: select, attend, and the indexer's KL on the selection, both backwards
        sel = ops.lightning_indexer_topk(qi.detach(), ki.detach(), wi.detach(), TOPK)
        o, lse = ops.sparse_attention(q, k, v, sel, return_lse=True)
        kl = ops.indexer_kl_sparse(q, k, qi, ki, wi, sel, attn_lse=lse.detach())
        return o, kl

    def train_fwdbwd():
        o, kl = train_step()
        torch.autograd.backward([o, kl], [do, torch.ones_like(kl)])

    measure(rows, "dsa_train", f"triton-hkv{hkv}", T, train_step, train_fwdbwd, flops, hkv=hkv)


def gdn(T, rows):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    q, k, v = (randn(1, T, H, D) for _ in range(3))
    g = F.logsigmoid(torch.randn(1, T, H, device="cuda") + 2).requires_grad_()
    beta = torch.rand(1, T, H, device="cuda").requires_grad_()
    do = torch.randn_like(q)

    def fwd():
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

    measure(rows, "gated_deltanet", "fla", T, fwd, lambda: fwd().backward(do), None)


def summary(rows):
    """The issue's targets, from this run's rows."""
    get = {(r["op"], r["impl"], r["T"]): r for r in rows}
    for T in sorted({r["T"] for r in rows if r["T"]}):
        dense = get.get(("dense_attention", "flash-attn-4", T)) or get.get(("dense_attention", "cudnn-sdpa", T))
        for hkv in (1, 4):
            d = get.get(("dsa", f"triton-hkv{hkv}", T))
            if dense and d:
                print(f"T={T} hkv={hkv}: DSA fwd+bwd {d['fwdbwd_ms']:.2f} ms vs dense ({dense['impl']}) "
                      f"{dense['fwdbwd_ms']:.2f} ms -> {dense['fwdbwd_ms'] / d['fwdbwd_ms']:.2f}x (target 5x at 64k); "
                      f"fwd {dense['fwd_ms'] / d['fwd_ms']:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--hkv", type=int, nargs="+", default=[1, 4], help="KV heads of the DSA rows")
    ap.add_argument("--name", default="layer", help="results file name under $OUT")
    args = ap.parse_args()
    rows = []
    for T in args.T:
        guarded(rows, "dense_attention", lambda: dense_cudnn(T, rows))
        if "fa4" not in args.skip:
            guarded(rows, "dense_attention", lambda: dense_fa4(T, rows))
        for hkv in args.hkv:
            guarded(rows, "dsa", lambda: dsa(T, hkv, rows))
            torch.cuda.empty_cache()
        if "gdn" not in args.skip:
            guarded(rows, "gated_deltanet", lambda: gdn(T, rows))
        torch.cuda.empty_cache()
        save(rows, args.name)
    print_table(rows, cols=("op", "impl", "T", "fwd_ms", "fwdbwd_ms", "tflops", "fwd_tflops", "peak_mem_gb"))
    summary(rows)


if __name__ == "__main__":
    main()
