"""The rotary Triton kernel on a GPU against the PyTorch reference: bf16 and fp32, partial rotation, strided
inputs, values and gradients; and the backend choice under "auto" (the reference until the kernel is timed)."""

import pytest
import torch

from hybrid_lm import ops
from hybrid_lm.layers.rope import rope_cos_sin
from hybrid_lm.ops import backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B, T, H, D, R", [(2, 300, 16, 128, 128), (1, 1000, 4, 64, 32), (1, 77, 12, 96, 64)])
def test_rotary_kernel_matches_reference(dtype, B, T, H, D, R):
    gen = torch.Generator(device="cuda").manual_seed(T)
    wide = torch.randn(B, T, H, D + 8, device="cuda", generator=gen).to(dtype)
    x = wide[..., 4:4 + D].detach().requires_grad_()  # strided, as a slice of a fused projection
    pos = torch.randint(0, 32768, (B, T), device="cuda", generator=gen)
    cos, sin = rope_cos_sin(pos, R, 1e6)
    g = torch.randn(B, T, H, D, device="cuda", generator=gen).to(dtype)
    y = ops.rotary(x, cos, sin, backend="triton")
    (dx,) = torch.autograd.grad(y, x, g)
    y_r = ops.rotary(x, cos, sin, backend="reference")
    (dx_r,) = torch.autograd.grad(y_r, x, g)
    assert y.dtype == dtype and dx.dtype == dtype
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_r, **tol)
    torch.testing.assert_close(dx, dx_r, **tol)
    assert torch.equal(y[..., R:], x[..., R:])


def test_auto_picks_the_kernel_and_the_switch_restores_the_reference():
    from hybrid_lm.ops.triton import prefer_rotary_kernel

    dev = torch.device("cuda")
    assert backends.resolve_backend("rotary", "auto", dev, torch.bfloat16) == "triton"
    assert backends.resolve_backend("rotary", "reference", dev, torch.bfloat16) == "reference"
    try:
        prefer_rotary_kernel(False)
        assert backends.resolve_backend("rotary", "auto", dev, torch.bfloat16) == "reference"
    finally:
        prefer_rotary_kernel(True)
