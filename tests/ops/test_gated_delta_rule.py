"""gated_delta_rule(): chunked reference == step-by-step recurrence == a per-head matrix loop."""

import pytest
import torch
import torch.nn.functional as F

from hybrid_lm.ops import gated_delta_rule


def make(B, T, H, K=8, V=6, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    gate = F.logsigmoid(torch.randn(B, T, H, generator=g, dtype=dtype) + 2.0)
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v, gate, beta)]


def matrix_loop(q, k, v, g, beta, scale, h0=None):
    """The defining recurrence, one head and one token at a time with explicit matrices."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.zeros(B, T, H, V, dtype=q.dtype)
    final = torch.zeros(B, H, K, V, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, V, dtype=q.dtype) if h0 is None else h0[b, h].clone()
            for t in range(T):
                S = torch.exp(g[b, t, h]) * S
                kt = k[b, t, h][:, None]  # [K, 1]
                S = S + beta[b, t, h] * kt @ (v[b, t, h][None, :] - kt.T @ S)
                o[b, t, h] = S.T @ (q[b, t, h] * scale)
            final[b, h] = S
    return o, final


def test_recurrent_matches_matrix_loop():
    q, k, v, g, beta = make(2, 9, 2, K=4, V=3)
    h0 = torch.randn(2, 2, 4, 3, dtype=q.dtype)
    o, final = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="recurrent")
    ref_o, ref_final = matrix_loop(q, k, v, g, beta, 4 ** -0.5, h0)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(final, ref_final)


@pytest.mark.parametrize("T", [1, 5, 64, 150])
def test_chunked_equals_recurrent(T):
    q, k, v, g, beta = make(2, T, 3, seed=T)
    h0 = torch.randn(2, 3, 8, 6, dtype=q.dtype)
    kw = dict(initial_state=h0, output_final_state=True, scale=0.7)
    o, final = gated_delta_rule(q, k, v, g, beta, backend="reference", **kw)
    ref_o, ref_final = gated_delta_rule(q, k, v, g, beta, backend="recurrent", **kw)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(final, ref_final)


def test_strong_decay_stays_finite():
    q, k, v, g, beta = make(1, 130, 2, seed=1)
    g = g * 40  # cumulative log decay over a chunk reaches the thousands
    o, final = gated_delta_rule(q, k, v, g, beta, output_final_state=True, backend="reference")
    ref_o, ref_final = gated_delta_rule(q, k, v, g, beta, output_final_state=True, backend="recurrent")
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(final, ref_final)


def test_gradients_chunked_equal_recurrent():
    q, k, v, g, beta = make(1, 70, 2, K=4, V=3, seed=2, grad=True)
    h0 = torch.randn(1, 2, 4, 3, dtype=q.dtype, requires_grad=True)
    inputs = (q, k, v, g, beta, h0)
    do = torch.randn(1, 70, 2, 3, dtype=q.dtype)
    dh = torch.randn(1, 2, 4, 3, dtype=q.dtype)

    def grads(backend):
        o, final = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend=backend)
        return torch.autograd.grad((o * do).sum() + (final * dh).sum(), inputs)

    for got, want in zip(grads("reference"), grads("recurrent")):
        torch.testing.assert_close(got, want)


def test_use_qk_l2norm_equals_normalising_first():
    q, k, v, g, beta = make(2, 40, 2, seed=4)
    k = k * 3.0
    o, _ = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, backend="reference")
    qn, kn = (t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    ref, _ = gated_delta_rule(qn, kn, v, g, beta, backend="recurrent")
    torch.testing.assert_close(o, ref)


@pytest.mark.parametrize("backend", ["reference", "recurrent"])
def test_cu_seqlens_equals_separate_documents(backend):
    lengths = [70, 0, 5, 64, 30]
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, g, beta = make(1, T, 2, seed=5)
    h0 = torch.randn(len(lengths), 2, 8, 6, dtype=q.dtype)
    o, final = gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend
    )
    assert final.shape == (len(lengths), 2, 8, 6)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, f_n = gated_delta_rule(
            q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e],
            initial_state=h0[n:n + 1], output_final_state=True, backend="recurrent",
        )
        torch.testing.assert_close(o[:, s:e], o_n)
        torch.testing.assert_close(final[n], f_n[0])


def test_prefill_then_decode_equals_full_pass():
    q, k, v, g, beta = make(2, 80, 2, seed=6)
    full, full_state = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o, state = gated_delta_rule(q[:, :70], k[:, :70], v[:, :70], g[:, :70], beta[:, :70], output_final_state=True)
    steps = [o]
    for t in range(70, 80):
        o_t, state = gated_delta_rule(
            q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1],
            initial_state=state, output_final_state=True,
        )
        steps.append(o_t)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    torch.testing.assert_close(state, full_state)


def test_dtypes_follow_fla():
    q, k, v, g, beta = (t.float() for t in make(1, 20, 2))
    o, final = gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, output_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    ref, _ = gated_delta_rule(q, k, v, g, beta, backend="recurrent")
    torch.testing.assert_close(o.float(), ref, atol=5e-2, rtol=5e-2)
    o, final = gated_delta_rule(q, k, v, g, beta)
    assert o.dtype == torch.float32 and final is None


def test_bad_shapes_raise():
    q, k, v, g, beta = make(2, 6, 2)
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(1, 2, 8, 6, dtype=q.dtype))
    with pytest.raises(ValueError, match=r"g and beta"):
        gated_delta_rule(q, k, v, g[..., :1], beta)
    with pytest.raises(ValueError, match="B == 1"):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="end at"):
        gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 5]))
