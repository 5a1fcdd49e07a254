"""Triton kernels for DeepSeek Sparse Attention (arXiv 2512.02556), registered as ``"triton"`` backends.

- ``lightning_indexer_topk``: a sampled threshold per row, one streaming pass that keeps the keys above it, and
  the exact top-k of those candidates, with no [T, T] scores (``indexer_topk.py``; full scores + torch.topk or a
  radix-select kernel as options);
- ``sparse_attention``: gathered-row attention forward and backward (``sparse_attention.py``);
- ``indexer_kl_dense`` / ``indexer_kl_sparse``: the indexer's KL losses, forward and backward, streamed over the
  keys without a [T, T] tensor (``indexer_kl.py``);
- ``rotary``: rotary embeddings in one pass each way (``rotary.py``);
- ``rms_norm``: RMSNorm in one kernel each way, output in the dtype the next matmul takes (``norm.py``).

Importing this package imports no triton and queries no device: the kernel modules load on first use, and the
backends report themselves available only for CUDA tensors with triton importable. Shapes follow the ops.
"""

from __future__ import annotations

import torch

from ..backends import has_triton, register_backend

__all__ = ["TRITON_PRIORITY", "prefer_rotary_kernel", "prefer_rms_norm_kernel"]

# above "reference" (0) and "sdpa"-like torch paths (50): the kernels win under backend="auto" on CUDA
TRITON_PRIORITY = 100
_HALF = (torch.bfloat16, torch.float16)


def _triton_on_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in _HALF + (torch.float32,) and has_triton()


def _sparse_available(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in _HALF and _triton_on_cuda(device, dtype)


def _indexer_topk(q_idx, k_idx, weights, topk, *, cu_seqlens=None):
    from .indexer_topk import indexer_topk_triton

    return indexer_topk_triton(q_idx, k_idx, weights, topk, cu_seqlens=cu_seqlens)


def _sparse_attention(q, k, v, indices, *, scale, cu_seqlens=None, return_lse=False):
    from .sparse_attention import sparse_attention_triton

    return sparse_attention_triton(q, k, v, indices, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse)


register_backend("lightning_indexer_topk", "triton", _indexer_topk, available=_triton_on_cuda,
                 priority=TRITON_PRIORITY, requires="a CUDA device and triton")
register_backend("sparse_attention", "triton", _sparse_attention, available=_sparse_available,
                 priority=TRITON_PRIORITY, requires="a CUDA device, triton and bf16/fp16 inputs")


def _kl_dense(q, k, q_idx, k_idx, weights, *, scale, cu_seqlens=None, block=None):  # block: the reference's
    from .indexer_kl import indexer_kl_dense_triton

    return indexer_kl_dense_triton(q, k, q_idx, k_idx, weights, scale=scale, cu_seqlens=cu_seqlens)


def _kl_sparse(q, k, q_idx, k_idx, weights, indices, *, scale, cu_seqlens=None, attn_lse=None, block=None,
               forward_recomputed=False):
    from .indexer_kl import indexer_kl_sparse_triton

    return indexer_kl_sparse_triton(q, k, q_idx, k_idx, weights, indices, scale=scale, cu_seqlens=cu_seqlens,
                                    attn_lse=attn_lse, forward_recomputed=forward_recomputed)


def _needs_lse(features: dict) -> str | None:
    return None if features.get("attn_lse", True) else "it needs attn_lse (the sparse attention's log-sum-exp)"


register_backend("indexer_kl_dense", "triton", _kl_dense, available=_triton_on_cuda,
                 priority=TRITON_PRIORITY, requires="a CUDA device and triton")
register_backend("indexer_kl_sparse", "triton", _kl_sparse, available=_triton_on_cuda,
                 priority=TRITON_PRIORITY, requires="a CUDA device and triton", supports=_needs_lse)


def _rotary(x, cos, sin):
    from .rotary import rotary_triton

    return rotary_triton(x, cos, sin)


# "auto" picks the kernel on CUDA: on an H100 (2026-12-06, run 11) tests/gpu/test_rotary_kernel.py passed and
# dense-350m trained at 32k in 581 ms a step and 55.6 GiB with it, against 704 ms and 65.5 GiB with the fp32
# reference (run 10, another H100 of the same kind; BENCHMARKS.md). prefer_rotary_kernel(False) keeps the reference.
OPT_IN_PRIORITY = -10  # below "reference" (0): the kernel only when asked for by name


def prefer_rotary_kernel(on: bool = True) -> None:
    """Let "auto" pick the rotary kernel on CUDA (on, the default) or the reference (off): benchmarks compare the
    two."""
    register_backend("rotary", "triton", _rotary, available=_triton_on_cuda,
                     priority=TRITON_PRIORITY if on else OPT_IN_PRIORITY, requires="a CUDA device and triton")


prefer_rotary_kernel(True)


def _rms_norm(x, weight, eps, out_dtype):
    from .norm import rms_norm_triton

    return rms_norm_triton(x, weight, eps, out_dtype)


def prefer_rms_norm_kernel(on: bool = True) -> None:
    """Let "auto" pick the RMSNorm kernel on CUDA (on) or torch's F.rms_norm (off, the default until the kernel is
    timed in a whole model on a GPU; `bench_model.py --rms-norm-kernel` compares the two)."""
    register_backend("rms_norm", "triton", _rms_norm, available=_triton_on_cuda,  # fp64 takes the reference
                     priority=TRITON_PRIORITY if on else OPT_IN_PRIORITY, requires="a CUDA device and triton")


prefer_rms_norm_kernel(False)
