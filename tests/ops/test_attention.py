"""attention(): reference and sdpa backends against a brute-force full-mask softmax (fp64)."""

import importlib

import pytest
import torch

from hybrid_lm.ops import attention

attn_mod = importlib.import_module("hybrid_lm.ops.attention")
BACKENDS = ["reference", "sdpa"]


def naive_attention(q, k, v, causal=True, scale=None, window=None, doc=None):
    """Explicit [B, H, Tq, Tk] scores with a full mask; doc [Tk] gives document ids for packing."""
    B, Tq, HQ, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kr = k.repeat_interleave(HQ // HKV, dim=2)
    vr = v.repeat_interleave(HQ // HKV, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    qp = torch.arange(Tk - Tq, Tk)[:, None]
    kp = torch.arange(Tk)[None, :]
    mask = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        mask &= kp <= qp
    if window is not None:
        mask &= kp > qp - window
    if doc is not None:
        mask &= doc[None, :] == doc[-Tq:, None]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, vr)


def rand_qkv(B, Tq, Tk, HQ, HKV, D, DV, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(B * 1000 + Tq * 100 + Tk + HQ + D)
    q = torch.randn(B, Tq, HQ, D, generator=g, dtype=dtype)
    k = torch.randn(B, Tk, HKV, D, generator=g, dtype=dtype)
    v = torch.randn(B, Tk, HKV, DV, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


CASES = [
    # B, Tq, Tk, HQ, HKV, D, DV, causal, window
    (2, 9, 9, 4, 4, 8, 8, True, None),  # MHA
    (2, 9, 9, 6, 2, 8, 5, True, None),  # GQA, DV != D
    (1, 7, 7, 4, 1, 8, 8, True, None),  # MQA
    (2, 3, 11, 4, 2, 8, 8, True, None),  # Tq < Tk: bottom-right alignment
    (2, 1, 11, 4, 2, 8, 8, True, None),  # one decoding step
    (2, 12, 12, 4, 2, 8, 8, True, 3),  # sliding window
    (2, 5, 13, 4, 2, 8, 8, True, 4),  # window while decoding a block
    (2, 5, 13, 4, 2, 8, 8, False, None),  # bidirectional cross attention
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_matches_naive(case, backend, monkeypatch):
    B, Tq, Tk, HQ, HKV, D, DV, causal, window = case
    monkeypatch.setattr(attn_mod, "QUERY_CHUNK", 4)  # several query blocks
    q, k, v = rand_qkv(B, Tq, Tk, HQ, HKV, D, DV)
    out = attention(q, k, v, causal=causal, window=window, scale=0.3, backend=backend)
    ref = naive_attention(q, k, v, causal=causal, window=window, scale=0.3)
    assert out.shape == (B, Tq, HQ, DV) and out.dtype == q.dtype
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_and_bf16_keep_dtype(backend):
    q, k, v = rand_qkv(2, 6, 6, 4, 2, 8, 8, dtype=torch.float32)
    ref = naive_attention(q.double(), k.double(), v.double())
    out = attention(q, k, v, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out16 = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend=backend)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 3])
def test_cu_seqlens_equals_separate_documents(backend, window, monkeypatch):
    monkeypatch.setattr(attn_mod, "QUERY_CHUNK", 3)
    lengths = [5, 1, 0, 9, 4]
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = rand_qkv(1, T, T, 4, 2, 8, 6)
    out = attention(q, k, v, window=window, cu_seqlens=cu, backend=backend)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    torch.testing.assert_close(out, naive_attention(q, k, v, window=window, doc=doc))
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            sep = attention(q[:, s:e], k[:, s:e], v[:, s:e], window=window, backend=backend)
            torch.testing.assert_close(out[:, s:e], sep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]])
def test_gradients_match_naive(case, backend, monkeypatch):
    B, Tq, Tk, HQ, HKV, D, DV, causal, window = case
    monkeypatch.setattr(attn_mod, "QUERY_CHUNK", 2)  # rematerialised blocks in the reference
    q, k, v = rand_qkv(B, Tq, Tk, HQ, HKV, D, DV, grad=True)
    do = torch.randn(B, Tq, HQ, DV, dtype=q.dtype)
    grads = torch.autograd.grad((attention(q, k, v, window=window, backend=backend) * do).sum(), (q, k, v))
    ref = torch.autograd.grad((naive_attention(q, k, v, window=window) * do).sum(), (q, k, v))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want)


def test_future_keys_never_change_past_outputs():
    q, k, v = rand_qkv(1, 10, 10, 2, 2, 8, 8)
    out = attention(q, k, v, backend="reference")
    k2, v2 = k.clone(), v.clone()
    k2[:, 6:] += 1.0
    v2[:, 6:] -= 2.0
    out2 = attention(q, k2, v2, backend="reference")
    torch.testing.assert_close(out[:, :6], out2[:, :6])
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


def test_prefill_then_decode_equals_full():
    q, k, v = rand_qkv(2, 12, 12, 4, 2, 8, 8)
    full = attention(q, k, v)
    steps = [attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1]) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=(1, 5, 4, 8), k=(1, 3, 2, 8)), "Tq"),
        (dict(q=(1, 5, 3, 8), k=(1, 5, 2, 8)), "multiple"),
        (dict(q=(1, 5, 4, 8), k=(1, 5, 2, 4)), "disagree"),
    ],
)
def test_bad_shapes_raise(kwargs, match):
    q = torch.randn(*kwargs["q"])
    k = torch.randn(*kwargs["k"])
    with pytest.raises(ValueError, match=match):
        attention(q, k, k)


def test_bad_options_raise():
    q, k, v = rand_qkv(2, 5, 5, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="causal"):
        attention(q, k, v, causal=False, window=2)
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="B == 1"):
        attention(q, k, v, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="end at"):
        attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 4]))
