"""Tests for the DSA indexer losses (hybrid_lm/ops/dsa_loss.py) against [T, T] brute-force references."""

import time

import pytest
import torch

from hybrid_lm.ops.dsa_loss import (
    _naive_attention_recall,
    _naive_indexer_kl_dense,
    _naive_indexer_kl_sparse,
    attention_recall,
    indexer_kl_dense,
    indexer_kl_sparse,
)

F64 = torch.float64


def make_inputs(B=2, T=37, HQ=4, HKV=2, D=8, HI=3, DI=6, dtype=F64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=F64) * 2
    k = torch.randn(B, T, HKV, D, generator=g, dtype=F64) * 2
    q_idx = torch.randn(B, T, HI, DI, generator=g, dtype=F64)
    k_idx = torch.randn(B, T, DI, generator=g, dtype=F64)
    weights = torch.randn(B, T, HI, generator=g, dtype=F64)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q_idx, k_idx, weights)]
    return q.to(device, dtype), k.to(device, dtype), *leaves


def random_indices(B, T, K, cu_seqlens=None, seed=1, pad=0.2):
    """Distinct visible keys per row (offsets within the document), some slots -1, some pointing to the future."""
    g = torch.Generator().manual_seed(seed)
    start = torch.zeros(T, dtype=torch.long)
    if cu_seqlens is not None:
        for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            start[a:b] = a
    out = torch.full((B, T, K), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            n = t - start[t].item() + 1
            perm = torch.randperm(n + 3, generator=g)[:K]  # offsets >= n are future keys: must be ignored
            out[b, t, : len(perm)] = perm
    out[torch.rand(out.shape, generator=g) < pad] = -1
    return out


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, retain_graph=True)


def assert_close_with_grads(fast, ref, leaves, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(fast.double(), ref.double(), rtol=rtol, atol=atol)
    for a, b in zip(grads(fast, leaves), grads(ref, leaves)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("HQ,HKV", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("block", [5, 16, 64])
def test_dense_matches_naive(HQ, HKV, block):
    q, k, *leaves = make_inputs(HQ=HQ, HKV=HKV)
    fast = indexer_kl_dense(q, k, *leaves, block=block)
    ref = _naive_indexer_kl_dense(q, k, *leaves)
    assert fast.item() > 0
    assert_close_with_grads(fast, ref, leaves)


def test_dense_scale_and_no_grad_to_main_attention():
    q, k, *leaves = make_inputs()
    q.requires_grad_()
    k.requires_grad_()
    fast = indexer_kl_dense(q, k, *leaves, scale=0.3, block=8)
    ref = _naive_indexer_kl_dense(q, k, *leaves, scale=0.3)
    assert_close_with_grads(fast, ref, leaves)
    indexer_kl_dense(q, k, *leaves, block=8).backward()
    indexer_kl_sparse(q, k, *leaves, random_indices(2, 37, K=4), block=8).backward()
    assert leaves[0].grad is not None
    assert q.grad is None and k.grad is None


CU = torch.tensor([0, 7, 7, 20, 31], dtype=torch.int32)  # includes an empty document


@pytest.mark.parametrize("block", [4, 9, 64])
def test_dense_packed_documents(block):
    q, k, *leaves = make_inputs(B=1, T=31, HQ=4, HKV=1)
    fast = indexer_kl_dense(q, k, *leaves, cu_seqlens=CU, block=block)
    ref = _naive_indexer_kl_dense(q, k, *leaves, cu_seqlens=CU)
    assert_close_with_grads(fast, ref, leaves)
    # packed == token-weighted mean of the documents run one by one
    per_doc = 0
    for a, b in zip(CU[:-1].tolist(), CU[1:].tolist()):
        if b > a:
            part = [t[:, a:b] for t in (q, k, *leaves)]
            per_doc = per_doc + indexer_kl_dense(*part, block=block) * (b - a)
    torch.testing.assert_close(fast, per_doc / 31, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(fast, leaves), grads(per_doc / 31, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_dense_zero_when_indexer_reproduces_attention():
    # one effective head (two identical query heads on one KV head) and positive dots: relu is the identity,
    # so I = scale * q.k exactly and softmax(I) == p
    T, D, scale = 23, 5, 0.7
    g = torch.Generator().manual_seed(3)
    q1 = torch.rand(1, T, 1, D, generator=g, dtype=F64)
    k = torch.rand(1, T, 1, D, generator=g, dtype=F64)
    q = q1.expand(1, T, 2, D)
    q_idx = (q1 * scale**0.5).clone().requires_grad_()
    k_idx = (k[:, :, 0] * scale**0.5).clone().requires_grad_()
    w = torch.ones(1, T, 1, dtype=F64, requires_grad=True)
    loss = indexer_kl_dense(q, k, q_idx, k_idx, w, scale=scale, block=6)
    assert abs(loss.item()) < 1e-12
    for gr in grads(loss, [q_idx, k_idx, w]):
        assert gr.abs().max().item() < 1e-12
    # perturbing the indexer makes the KL strictly positive
    loss2 = indexer_kl_dense(q, k, q_idx, k_idx, w * 1.5, scale=scale, block=6)
    assert loss2.item() > 1e-6


@pytest.mark.parametrize("HQ,HKV", [(4, 2), (3, 1)])
@pytest.mark.parametrize("block", [7, 64])
def test_sparse_matches_naive(HQ, HKV, block):
    q, k, *leaves = make_inputs(HQ=HQ, HKV=HKV)
    idx = random_indices(2, 37, K=6)
    fast = indexer_kl_sparse(q, k, *leaves, idx, block=block)
    ref = _naive_indexer_kl_sparse(q, k, *leaves, idx)
    assert fast.item() > 0
    assert_close_with_grads(fast, ref, leaves)


def sparse_lse(q, k, idx, cu_seqlens=None):
    """Natural-log sum of exp(scale * q.k) over each row's visible selected keys, per head [B, T, HQ]."""
    from hybrid_lm.ops.dsa_loss import _naive_selected

    kk = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * q.shape[-1] ** -0.5
    s = s.masked_fill(~_naive_selected(idx, cu_seqlens)[:, None], float("-inf"))
    return s.logsumexp(-1).transpose(1, 2)


def test_sparse_packed_and_attn_lse():
    q, k, *leaves = make_inputs(B=1, T=31, HQ=4, HKV=2)
    idx = random_indices(1, 31, K=5, cu_seqlens=CU, seed=4)
    ref = _naive_indexer_kl_sparse(q, k, *leaves, idx, cu_seqlens=CU)
    fast = indexer_kl_sparse(q, k, *leaves, idx, cu_seqlens=CU, block=6)
    assert_close_with_grads(fast, ref, leaves)
    lse = sparse_lse(q, k, idx, CU)
    with_lse = indexer_kl_sparse(q, k, *leaves, idx, cu_seqlens=CU, attn_lse=lse, block=6)
    assert_close_with_grads(with_lse, ref, leaves)


def test_sparse_with_all_keys_equals_dense():
    T = 29
    q, k, *leaves = make_inputs(T=T, HQ=4, HKV=1)
    idx = torch.arange(T).expand(2, T, T).flip(-1)  # K == T: every visible key (future ones are ignored)
    sparse = indexer_kl_sparse(q, k, *leaves, idx, block=8)
    dense = indexer_kl_dense(q, k, *leaves, block=8)
    assert_close_with_grads(sparse, dense, leaves)
    # packed: offsets within each document
    q, k, *leaves = make_inputs(B=1, T=31)
    idx = torch.arange(31).expand(1, 31, 31)
    sparse = indexer_kl_sparse(q, k, *leaves, idx, cu_seqlens=CU, block=5)
    dense = indexer_kl_dense(q, k, *leaves, cu_seqlens=CU, block=5)
    assert_close_with_grads(sparse, dense, leaves)


def test_sparse_empty_rows_and_singletons_are_zero():
    q, k, *leaves = make_inputs(T=12)
    idx = torch.full((2, 12, 3), -1)
    idx[:, :, 0] = torch.arange(12)  # one key each: both distributions are a point mass
    idx[:, ::3, 0] = -1  # no key at all
    loss = indexer_kl_sparse(q, k, *leaves, idx, block=5)
    assert loss.item() == 0.0
    assert all(torch.isfinite(gr).all() and gr.abs().max() == 0 for gr in grads(loss, leaves))


@pytest.mark.parametrize("cu", [None, CU])
def test_recall(cu):
    B = 2 if cu is None else 1
    q, k, *_ = make_inputs(B=B, T=31, HQ=4, HKV=2)
    idx = random_indices(B, 31, K=7, cu_seqlens=cu, seed=5)
    r = attention_recall(q, k, idx, cu_seqlens=cu, block=6)
    ref = _naive_attention_recall(q, k, idx, cu_seqlens=cu)
    assert 0 < r.item() < 1
    torch.testing.assert_close(r, ref, rtol=1e-12, atol=1e-12)
    full = torch.arange(31).expand(B, 31, 31)
    assert abs(attention_recall(q, k, full, cu_seqlens=cu, block=7).item() - 1) < 1e-12
    # duplicates count once
    dup = torch.cat([idx, idx], -1)
    torch.testing.assert_close(attention_recall(q, k, dup, cu_seqlens=cu, block=6), r)


def test_low_precision_inputs():
    q, k, *leaves = make_inputs(dtype=torch.bfloat16)
    loss = indexer_kl_dense(q, k, *leaves, block=16)
    assert loss.dtype == torch.float32
    gs = grads(loss, leaves)
    assert all(gr.dtype == torch.bfloat16 for gr in gs)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _naive_indexer_kl_dense(q.double(), k.double(), *ref_leaves)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    idx = random_indices(2, 37, K=4)
    assert indexer_kl_sparse(q, k, *leaves, idx).dtype == torch.float32
    assert attention_recall(q, k, idx).dtype == torch.float32


def test_bad_inputs_raise():
    q, k, *leaves = make_inputs(HQ=4, HKV=3)
    with pytest.raises(ValueError, match="multiple"):
        indexer_kl_dense(q, k, *leaves)
    q, k, *leaves = make_inputs()
    with pytest.raises(ValueError, match="batch size 1"):
        indexer_kl_dense(q, k, *leaves, cu_seqlens=torch.tensor([0, 37]))
    q, k, *leaves = make_inputs(B=1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        indexer_kl_dense(q, k, *leaves, cu_seqlens=torch.tensor([0, 30]))
    with pytest.raises(ValueError, match="weights"):
        indexer_kl_dense(q, k, leaves[0], leaves[1], leaves[2][..., :2])
    with pytest.raises(ValueError, match="block"):
        indexer_kl_dense(q, k, *leaves, block=0)
    with pytest.raises(ValueError, match="indices"):
        indexer_kl_sparse(q, k, *leaves, torch.zeros(1, 37, 4))
    with pytest.raises(ValueError, match="attn_lse"):
        indexer_kl_sparse(q, k, *leaves, torch.zeros(1, 37, 4, dtype=torch.long), attn_lse=torch.zeros(1, 37))


def test_long_sequence_never_materialises_t_by_t():
    """T = 2048: forward + backward stay fast, and no op ever produces a tensor with T*T elements or more."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.largest = max(self.largest, o.numel())
            return out

    T = 2048
    q, k, *leaves = make_inputs(B=1, T=T, HQ=2, HKV=1, D=16, HI=2, DI=16, dtype=torch.float32)
    start = time.perf_counter()
    with LargestTensor() as mode:
        loss = indexer_kl_dense(q, k, *leaves, block=128)
        gs = grads(loss, leaves)
    assert time.perf_counter() - start < 20
    assert torch.isfinite(loss) and all(torch.isfinite(gr).all() for gr in gs)
    assert mode.largest < T * T // 4, mode.largest  # largest temporaries are [B, block, HI, T]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu = make_inputs(B=1, T=300, HQ=4, HKV=2, dtype=torch.float32)
    gpu = make_inputs(B=1, T=300, HQ=4, HKV=2, dtype=torch.float32, device="cuda")
    idx = random_indices(1, 300, K=16)
    for fn, extra in ((indexer_kl_dense, ()), (indexer_kl_sparse, (idx,))):
        a = fn(*cpu, *extra, block=64)
        b = fn(*gpu, *[e.cuda() for e in extra], block=64)
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
        for ga, gb in zip(grads(a, cpu[2:]), grads(b, gpu[2:])):
            torch.testing.assert_close(gb.cpu(), ga, rtol=1e-3, atol=1e-5)
