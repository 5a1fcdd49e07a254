"""causal_conv1d(): against F.conv1d with left padding, state hand-off, decoding and packed documents."""

import pytest
import torch
import torch.nn.functional as F

from hybrid_lm.ops import causal_conv1d


def make(B, T, C, W, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, dtype=dtype)
    w = torch.randn(C, W, generator=g, dtype=dtype)
    b = torch.randn(C, generator=g, dtype=dtype)
    return x, w, b


def torch_conv(x, w, b, activation="silu"):
    """Depthwise conv over [B, C, T] with W-1 zeros on the left."""
    y = F.conv1d(F.pad(x.transpose(1, 2), (w.shape[1] - 1, 0)), w[:, None, :], b, groups=w.shape[0])
    y = y.transpose(1, 2)
    return F.silu(y) if activation else y


def last_inputs(x, W):
    """[B, C, W-1] of the last W-1 inputs, zero-padded on the left."""
    return F.pad(x.transpose(1, 2), (W - 1, 0))[:, :, -(W - 1):] if W > 1 else x.new_zeros(x.shape[0], x.shape[2], 0)


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("W", [1, 2, 4])
def test_matches_torch_conv(W, activation):
    x, w, b = make(2, 11, 5, W)
    y, final = causal_conv1d(x, w, b, activation=activation, output_final_state=True)
    torch.testing.assert_close(y, torch_conv(x, w, b, activation))
    torch.testing.assert_close(final, last_inputs(x, W))
    y_nb, _ = causal_conv1d(x, w, None, activation=activation)
    torch.testing.assert_close(y_nb, torch_conv(x, w, None, activation))


@pytest.mark.parametrize("split", [1, 2, 6])
def test_state_hand_off_equals_one_pass(split):
    W = 4
    x, w, b = make(2, 9, 3, W, seed=split)
    full, full_state = causal_conv1d(x, w, b, output_final_state=True)
    y1, s1 = causal_conv1d(x[:, :split], w, b, output_final_state=True)
    y2, s2 = causal_conv1d(x[:, split:], w, b, initial_state=s1, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), full)
    torch.testing.assert_close(s2, full_state)


def test_decode_one_token_at_a_time():
    x, w, b = make(1, 8, 4, 4)
    full = causal_conv1d(x, w, b)[0]
    state, steps = None, []
    for t in range(8):
        y_t, state = causal_conv1d(x[:, t:t + 1], w, b, initial_state=state, output_final_state=True)
        steps.append(y_t)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


@pytest.mark.parametrize("W", [1, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_cu_seqlens_equals_separate_documents(W, with_state):
    lengths = [6, 2, 0, 1, 9]
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    x, w, b = make(1, T, 3, W, seed=W)
    h0 = torch.randn(len(lengths), 3, W - 1, dtype=x.dtype) if with_state else None
    y, final = causal_conv1d(x, w, b, cu_seqlens=cu, initial_state=h0, output_final_state=True)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y_n, f_n = causal_conv1d(
            x[:, s:e], w, b, initial_state=None if h0 is None else h0[n:n + 1], output_final_state=True
        )
        torch.testing.assert_close(y[:, s:e], y_n)
        torch.testing.assert_close(final[n], f_n[0])


def test_cu_seqlens_gradients_equal_separate_documents():
    lengths = [5, 2, 7]
    cu = torch.tensor([0, 5, 7, 14])
    x, w, b = make(1, 14, 3, 4, seed=9)
    h0 = torch.randn(3, 3, 3, dtype=x.dtype)
    for t in (x, w, b, h0):
        t.requires_grad_(True)
    dy = torch.randn_like(x)
    df = torch.randn(3, 3, 3, dtype=x.dtype)
    y, final = causal_conv1d(x, w, b, cu_seqlens=cu, initial_state=h0, output_final_state=True)
    packed = torch.autograd.grad((y * dy).sum() + (final * df).sum(), (x, w, b, h0))
    loss = 0
    for n, (s, e) in enumerate(zip([0, 5, 7], [5, 7, 14])):
        y_n, f_n = causal_conv1d(x[:, s:e], w, b, initial_state=h0[n:n + 1], output_final_state=True)
        loss = loss + (y_n * dy[:, s:e]).sum() + (f_n * df[n:n + 1]).sum()
    separate = torch.autograd.grad(loss, (x, w, b, h0))
    for got, want in zip(packed, separate):
        torch.testing.assert_close(got, want)
    assert sum(lengths) == 14


def test_dtype_is_kept():
    x, w, b = make(2, 5, 3, 4, dtype=torch.float32)
    y, final = causal_conv1d(x.bfloat16(), w, b, output_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.bfloat16


def test_bad_arguments_raise():
    x, w, b = make(2, 5, 3, 4)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, b, activation="relu")
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, w[:2], b)
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, w, b, initial_state=torch.zeros(2, 3, 4, dtype=x.dtype))
    with pytest.raises(ValueError, match="B == 1"):
        causal_conv1d(x, w, b, cu_seqlens=torch.tensor([0, 5]))
