"""The pure-PyTorch references compute in fp32 (fp64 for fp64 inputs) whatever autocast says: under a bf16
autocast (a CPU bf16 training step, or a GPU without the fast backend) their einsums and matmuls must not drop to
bf16. DSA.md: the indexer's score sum stays in fp32; a bf16 sum changes which keys top-k keeps."""

import importlib

import pytest
import torch

from hybrid_lm import ops


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _same_under_autocast(fn):
    plain = fn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = fn()
    for a, b in zip(plain if isinstance(plain, tuple) else (plain,), cast if isinstance(cast, tuple) else (cast,)):
        if a is None:
            continue
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_indexer_scores_and_topk_stay_fp32_under_autocast():
    q, k, w = _randn(1, 256, 4, 32, seed=1), _randn(1, 256, 32, seed=2), _randn(1, 256, 4, seed=3)
    _same_under_autocast(lambda: ops.lightning_indexer_scores(q, k, w))
    _same_under_autocast(lambda: ops.lightning_indexer_topk(q, k, w, 32, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_references_stay_fp32_under_autocast(dtype):
    q, k, v = (3 * _randn(1, 64, 4, 32, seed=s).to(dtype) for s in (1, 2, 3))
    k, v = k[:, :, :2], v[:, :, :2]
    _same_under_autocast(lambda: ops.attention(q, k, v, backend="reference"))
    _same_under_autocast(lambda: ops.attention(q, k, v, window=7, backend="reference"))
    idx = ops.lightning_indexer_topk(_randn(1, 64, 2, 8, seed=4), _randn(1, 64, 8, seed=5), _randn(1, 64, 2), 16)
    _same_under_autocast(lambda: ops.sparse_attention(q, k, v, idx, return_lse=True, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", "recurrent"])
def test_gated_delta_rule_references_stay_fp32_under_autocast(backend):
    q, k, v = (_randn(1, 80, 2, 16, seed=s).bfloat16() for s in (1, 2, 3))
    g, beta = -0.1 * _randn(1, 80, 2, seed=4).abs(), _randn(1, 80, 2, seed=5).sigmoid()
    h0 = _randn(1, 2, 16, 16, seed=6)
    _same_under_autocast(lambda: ops.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                      use_qk_l2norm=True, backend=backend))


def test_causal_conv_reference_stays_fp32_under_autocast():
    x, w, b = _randn(2, 20, 8, seed=1), _randn(8, 4, seed=2), _randn(8, seed=3)
    _same_under_autocast(lambda: ops.causal_conv1d(x, w, b, output_final_state=True, backend="reference"))
    cu = torch.tensor([0, 7, 20])
    _same_under_autocast(lambda: ops.causal_conv1d(x[:1], w, b, cu_seqlens=cu, backend="reference"))


def test_reference_gradients_under_autocast_match_plain_ones():
    # the forward under autocast, the backward outside it (as a training step does); the attention reference
    # recomputes its query blocks in the backward (QUERY_CHUNK lowered), which must not fall back to bf16 either
    q, k, v = (_randn(1, 40, 2, 16, seed=s).requires_grad_() for s in (1, 2, 3))
    idx = ops.lightning_indexer_topk(_randn(1, 40, 2, 8, seed=4), _randn(1, 40, 8, seed=5), _randn(1, 40, 2), 8)

    def grads(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o = ops.attention(q, k, v, backend="reference") + ops.sparse_attention(q, k, v, idx, backend="reference")
        return torch.autograd.grad(o.square().sum(), (q, k, v))

    attention_module = importlib.import_module("hybrid_lm.ops.attention")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_module, "QUERY_CHUNK", 8)
        for a, b in zip(grads(False), grads(True)):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
