"""Rotary embeddings: apply_rope equals the textbook rotate-half formula bit for bit (fp32 math for any input dtype),
rotates only the first R dims, and preserves each rotated pair's norm."""

import pytest
import torch

from hybrid_lm.layers.rope import apply_rope, rope_cos_sin


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotated", [16, 8])
def test_apply_rope_is_the_rotate_half_formula(dtype, rotated):
    x = torch.randn(2, 33, 3, 16, dtype=dtype)
    pos = torch.arange(5, 38).expand(2, 33)
    cos, sin = rope_cos_sin(pos, rotated, 10000.0)
    c, s = cos[:, :, None], sin[:, :, None]
    xr = x[..., :rotated].float()
    want = torch.cat([(xr * c + rotate_half(xr) * s).to(dtype), x[..., rotated:]], dim=-1)
    got = apply_rope(x, cos, sin)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(got[..., rotated:], x[..., rotated:])
    half = rotated // 2  # pairs (i, i + half) are rotated by one angle: their norm stays
    pair = lambda t: t[..., :half].float() ** 2 + t[..., half:rotated].float() ** 2  # noqa: E731
    torch.testing.assert_close(pair(got), pair(x), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


def test_apply_rope_gradient_is_the_inverse_rotation():
    x = torch.randn(1, 9, 2, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(9)[None], 8, 100.0)
    g = torch.randn(1, 9, 2, 8, dtype=torch.float64)
    (grad,) = torch.autograd.grad(apply_rope(x, cos, sin), x, g)
    # the rotation is orthogonal: its gradient rotates g back (by -angle); fp32 math inside
    back = apply_rope(g, cos, -sin)
    torch.testing.assert_close(grad, back, rtol=1e-5, atol=1e-6)


def test_rotary_op_rejects_bad_shapes_with_what_to_change():
    from hybrid_lm import ops

    x = torch.randn(1, 4, 2, 8)
    cos, sin = rope_cos_sin(torch.arange(4)[None], 8, 100.0)
    with pytest.raises(ValueError, match=r"cos / sin \[B, T, R\]"):
        ops.rotary(x, cos[0], sin[0])
    c, s = rope_cos_sin(torch.arange(4)[None], 10, 100.0)
    with pytest.raises(ValueError, match="R = 10 must be even and in"):
        ops.rotary(x, c, s)
    with pytest.raises(ValueError, match="cannot run here"):
        ops.rotary(x, cos, sin, backend="triton")  # CPU tensors: the reference only
