"""CUDA backends (fla, flash-attn, sdpa) against the references in bf16. Skipped without a GPU."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from hybrid_lm import ops
from hybrid_lm.ops import backends

gdr_mod = importlib.import_module("hybrid_lm.ops.gated_delta_rule")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_fla = pytest.mark.skipif(not backends.has_fla(), reason="needs fla (flash-linear-attention)")
needs_flash = pytest.mark.skipif(backends.has_flash_attn() is None, reason="needs flash-attn")
BF16 = torch.bfloat16


def close(got, want, tol=2e-2):
    got, want = got.float(), want.float()
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() + 1e-6
    assert err <= tol * scale, f"max abs err {err:.3g} vs max |ref| {scale:.3g}"


def gdr_inputs(B, T, H, K, V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, K, device="cuda", generator=g)
    k = F.normalize(torch.randn(B, T, H, K, device="cuda", generator=g), dim=-1)
    v = torch.randn(B, T, H, V, device="cuda", generator=g)
    gate = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=g) + 2)
    beta = torch.rand(B, T, H, device="cuda", generator=g)
    return q, k, v, gate, beta


def fla_case(varlen, dtype):
    q, k, v, gate, beta = gdr_inputs(1 if varlen else 2, 300, 4, 64, 64)
    cu = torch.tensor([0, 100, 171, 300], device="cuda") if varlen else None
    h0 = torch.randn(3 if varlen else 2, 4, 64, 64, device="cuda") * 0.1
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, use_qk_l2norm=True)
    return (q, k, v), (gate, beta), kw


@needs_fla
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("varlen", [False, True])
def test_fla_gated_delta_rule_forward_matches_reference(varlen, dtype):
    qkv, (gate, beta), kw = fla_case(varlen, dtype)
    with torch.no_grad():
        o, final = ops.gated_delta_rule(*(t.to(dtype) for t in qkv), gate, beta, backend="fla", **kw)
        ref, ref_final = ops.gated_delta_rule(*qkv, gate, beta, backend="reference", **kw)
    assert o.dtype == dtype and final.dtype == torch.float32
    close(o, ref)
    close(final, ref_final)


@needs_fla
@pytest.mark.parametrize("varlen", [False, True])
def test_fla_gated_delta_rule_backward_matches_reference(varlen):
    if gdr_mod._fla_backward_blocker():
        pytest.skip(gdr_mod._fla_backward_blocker())
    qkv, (gate, beta), kw = fla_case(varlen, BF16)
    leaves = [t.bfloat16().requires_grad_() for t in qkv]
    ref_leaves = [t.clone().requires_grad_() for t in qkv]
    o, _ = ops.gated_delta_rule(*leaves, gate, beta, backend="fla", **kw)
    ref, _ = ops.gated_delta_rule(*ref_leaves, gate, beta, backend="reference", **kw)
    do = torch.randn_like(ref)
    (o.float() * do).sum().backward()
    (ref * do).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        close(got.grad, want.grad, tol=5e-2)


@needs_fla
def test_fla_backward_blocker_is_reported_not_hit():
    if not gdr_mod._fla_backward_blocker():
        pytest.skip("this fla/triton/GPU combination runs the fla backward")
    qkv, (gate, beta), kw = fla_case(False, BF16)
    leaves = [t.bfloat16().requires_grad_() for t in qkv]
    with pytest.raises(ValueError, match="triton"):
        ops.gated_delta_rule(*leaves, gate, beta, backend="fla", **kw)
    dev = torch.device("cuda")
    for grad, expected in [(True, "reference"), (False, "fla")]:
        features = {"requires_grad": grad}
        assert backends.resolve_backend("gated_delta_rule", "auto", dev, BF16, features=features) == expected


@needs_fla
@pytest.mark.parametrize("varlen", [False, True])
def test_fla_causal_conv1d_matches_reference(varlen):
    x = torch.randn(1 if varlen else 2, 200, 64, device="cuda", dtype=BF16)
    w = torch.randn(64, 4, device="cuda", dtype=BF16)
    b = torch.randn(64, device="cuda", dtype=BF16)
    cu = torch.tensor([0, 3, 120, 200], device="cuda", dtype=torch.int32) if varlen else None
    h0 = torch.randn(3 if varlen else 2, 64, 3, device="cuda", dtype=BF16)
    kw = dict(cu_seqlens=cu, initial_state=h0, output_final_state=True)
    y, final = ops.causal_conv1d(x, w, b, backend="fla", **kw)
    ref, ref_final = ops.causal_conv1d(x, w, b, backend="reference", **kw)
    close(y, ref)
    close(final, ref_final, tol=1e-3)


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("flash_attn", marks=needs_flash)])
@pytest.mark.parametrize(
    "Tq, Tk, window, varlen",
    [(256, 256, None, False), (64, 256, None, False), (256, 256, 32, False), (256, 256, None, True)],
)
def test_cuda_attention_matches_reference(backend, Tq, Tk, window, varlen):
    B = 1 if varlen else 2
    q = torch.randn(B, Tq, 8, 128, device="cuda", dtype=BF16)
    k = torch.randn(B, Tk, 2, 128, device="cuda", dtype=BF16)
    v = torch.randn(B, Tk, 2, 128, device="cuda", dtype=BF16)
    cu = torch.tensor([0, 50, 51, 256], device="cuda", dtype=torch.int32) if varlen else None
    out = ops.attention(q, k, v, window=window, cu_seqlens=cu, backend=backend)
    ref = ops.attention(q.float(), k.float(), v.float(), window=window, cu_seqlens=cu, backend="reference")
    assert out.dtype == BF16
    close(out, ref)


def test_cuda_auto_prefers_fast_backends():
    dev = torch.device("cuda")
    expected_attn = "flash_attn" if backends.has_flash_attn() else "sdpa"
    features = {"head_dim": 128, "head_dim_v": 128, "device": dev}
    assert backends.resolve_backend("attention", "auto", dev, BF16, features=features) == expected_attn
    expected_gdr = "fla" if backends.has_fla() else "reference"
    assert backends.resolve_backend("gated_delta_rule", "auto", dev, BF16) == expected_gdr


def test_dsa_ops_run_on_cuda():
    q_idx = torch.randn(1, 300, 4, 32, device="cuda")
    k_idx = torch.randn(1, 300, 32, device="cuda")
    w = torch.randn(1, 300, 4, device="cuda")
    idx = ops.lightning_indexer_topk(q_idx, k_idx, w, 64)
    q = torch.randn(1, 300, 8, 64, device="cuda", dtype=BF16)
    kv = torch.randn(1, 300, 1, 64, device="cuda", dtype=BF16)
    out = ops.sparse_attention(q, kv, kv, idx)
    assert out.shape == (1, 300, 8, 64) and out.dtype == BF16 and torch.isfinite(out.float()).all()
    dense_idx = ops.lightning_indexer_topk(q_idx[:, :50], k_idx[:, :50], w[:, :50], 64)
    close(ops.sparse_attention(q[:, :50], kv[:, :50], kv[:, :50], dense_idx),
          ops.attention(q[:, :50], kv[:, :50], kv[:, :50], backend="reference"))
