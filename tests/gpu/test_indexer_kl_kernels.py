"""Triton indexer KL kernels (hybrid_lm/ops/triton/indexer_kl.py) against the pure-PyTorch reference.

Both stages, loss and gradients (q_idx, k_idx, weights), on fresh random inputs: MQA, GQA, MHA, packed documents,
rows with fewer visible keys than topk, fp32 (tight) and bf16 (the reference runs in fp32 on the same bf16 values).
The sparse stage takes its indices from the lightning indexer's own top-k and its lse from the sparse attention.
"""

import pytest
import torch

from hybrid_lm import ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [
    # B, T, HQ, HKV, D, HI, DI, topk, cu_seqlens
    (2, 300, 16, 1, 128, 4, 64, 64, None),  # MQA, V3.2's layout
    (1, 257, 8, 2, 64, 4, 64, 100, None),  # GQA, T not a multiple of any block
    (2, 128, 4, 4, 32, 2, 32, 16, None),  # MHA, small heads
    (1, 300, 8, 2, 128, 4, 64, 64, [0, 1, 90, 300]),  # packed documents (one of length 1)
    (1, 190, 6, 3, 48, 3, 48, 48, None),  # odd head counts and head dims
]


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def inputs(B, T, HQ, HKV, D, HI, DI, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=gen) * scale).to(dtype)  # noqa: E731
    q, k = r(B, T, HQ, D), r(B, T, HKV, D)
    q_idx, k_idx, w = r(B, T, HI, DI), r(B, T, DI), r(B, T, HI, scale=DI ** -0.5)
    return q, k, q_idx, k_idx, w


def loss_and_grads(fn, q_idx, k_idx, w, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q_idx, k_idx, w)]
    loss = fn(*leaves, **kw)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def check_against_reference(run, dtype):
    """run(backend, cast) -> (loss, grads): Triton on the inputs vs the reference on their fp32 values."""
    got, ggrads = run("triton", lambda x: x)
    want, wgrads = run("reference", lambda x: x.float())
    tol_loss, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (2e-3, 2e-2)
    assert rel_err(got, want) < tol_loss, (got.item(), want.item())
    for name, g, r in zip(("q_idx", "k_idx", "weights"), ggrads, wgrads):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol_grad, (name, rel_err(g, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_dense_warmup_kl_matches_reference(case, dtype):
    B, T, HQ, HKV, D, HI, DI, topk, cu = case
    q, k, q_idx, k_idx, w = inputs(B, T, HQ, HKV, D, HI, DI, dtype, seed=T)
    cu = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)

    def run(backend, cast):
        def f(qi, ki, ww):
            return ops.indexer_kl_dense(cast(q), cast(k), cast(qi), cast(ki), cast(ww), cu_seqlens=cu,
                                        backend=backend)
        return loss_and_grads(f, q_idx, k_idx, w)

    check_against_reference(run, dtype)


@pytest.mark.parametrize("one_sweep", [False, True], ids=["two-sweeps", "one-sweep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_sparse_kl_matches_reference(case, dtype, one_sweep, monkeypatch):
    from hybrid_lm.ops.triton import indexer_kl

    monkeypatch.setattr(indexer_kl, "SPARSE_ONE_SWEEP", one_sweep)
    B, T, HQ, HKV, D, HI, DI, topk, cu = case
    q, k, q_idx, k_idx, w = inputs(B, T, HQ, HKV, D, HI, DI, dtype, seed=T + 1)
    cu = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)
    indices = ops.lightning_indexer_topk(q_idx.float(), k_idx.float(), w.float(), topk, cu_seqlens=cu,
                                         backend="reference")
    assert (indices < 0).any(), "the early rows must see fewer keys than topk"
    _, lse = ops.sparse_attention(q.float(), k.float(), k.float(), indices, cu_seqlens=cu, return_lse=True,
                                  backend="reference")

    def run(backend, cast):
        def f(qi, ki, ww):
            return ops.indexer_kl_sparse(cast(q), cast(k), cast(qi), cast(ki), cast(ww), indices, cu_seqlens=cu,
                                         attn_lse=lse, backend=backend)
        return loss_and_grads(f, q_idx, k_idx, w)

    check_against_reference(run, dtype)


@pytest.mark.parametrize("one_sweep", [False, True], ids=["two-sweeps", "one-sweep"])
def test_long_sequence_bf16(one_sweep, monkeypatch):
    """T = 4,096, topk 2,048, MQA 16 x 128 with 4 index heads x 64: both stages against the reference."""
    from hybrid_lm.ops.triton import indexer_kl

    monkeypatch.setattr(indexer_kl, "SPARSE_ONE_SWEEP", one_sweep)
    B, T, HQ, HKV, D, HI, DI, topk = 1, 4096, 16, 1, 128, 4, 64, 2048
    q, k, q_idx, k_idx, w = inputs(B, T, HQ, HKV, D, HI, DI, torch.bfloat16, seed=7)
    indices = ops.lightning_indexer_topk(q_idx, k_idx, w, topk)
    o, lse = ops.sparse_attention(q, k, k, indices, return_lse=True)
    for stage in ("dense", "sparse"):
        def f(backend):
            def g(qi, ki, ww):
                if stage == "dense":
                    return ops.indexer_kl_dense(q, k, qi, ki, ww, backend=backend)
                return ops.indexer_kl_sparse(q, k, qi, ki, ww, indices, attn_lse=lse, backend=backend)
            return g
        got, ggrads = loss_and_grads(f("triton"), q_idx, k_idx, w)
        want, wgrads = loss_and_grads(f("reference"), q_idx.float(), k_idx.float(), w.float())
        assert rel_err(got, want) < 2e-3, (stage, got.item(), want.item())
        for g, r in zip(ggrads, wgrads):
            assert rel_err(g, r) < 2e-2, stage


def test_auto_picks_triton_and_sparse_without_lse_falls_back():
    q, k, q_idx, k_idx, w = inputs(1, 64, 4, 1, 32, 2, 32, torch.bfloat16, seed=3)
    indices = ops.lightning_indexer_topk(q_idx, k_idx, w, 16)
    assert ops.resolve_backend("indexer_kl_dense", "auto", q.device, q.dtype) == "triton"
    # without the attention's lse the Triton sparse kernel cannot run: auto takes the reference, naming it fails
    loss = ops.indexer_kl_sparse(q, k, q_idx, k_idx, w, indices)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="attn_lse"):
        ops.indexer_kl_sparse(q, k, q_idx, k_idx, w, indices, backend="triton")


def test_mixed_dtypes_under_autocast():
    """Under autocast the index keys can come out of a LayerNorm in fp32 while the index queries are bf16."""
    q, k, q_idx, k_idx, w = inputs(1, 128, 4, 1, 32, 2, 32, torch.bfloat16, seed=11)
    k_idx = k_idx.float().requires_grad_()
    indices = ops.lightning_indexer_topk(q_idx, k_idx, w, 16)
    _, lse = ops.sparse_attention(q, k, k, indices, return_lse=True)
    for loss in (ops.indexer_kl_dense(q, k, q_idx, k_idx, w),
                 ops.indexer_kl_sparse(q, k, q_idx, k_idx, w, indices, attn_lse=lse)):
        (grad,) = torch.autograd.grad(loss, k_idx)
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
