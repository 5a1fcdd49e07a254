"""The RMSNorm Triton kernels on a GPU against torch's F.rms_norm: the blocks' fp32 residual stream normalised into
bf16, bf16 q/k heads normalised in place of dtype, a D that is not a power of 2; values and the gradients of x
and the weight; and the backend choice under "auto" (torch's F.rms_norm until the kernel is timed)."""

import pytest
import torch

from hybrid_lm import ops
from hybrid_lm.ops import backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("shape, x_dtype, out_dtype", [
    ((4, 4096, 1024), torch.float32, torch.bfloat16),   # a block norm under autocast
    ((2, 1000, 2048), torch.float32, torch.float32),
    ((2, 777, 16, 64), torch.bfloat16, torch.bfloat16),  # q_norm on bf16 heads
    ((3, 129, 768), torch.bfloat16, torch.bfloat16),
    ((1, 50, 5, 96), torch.float32, torch.bfloat16),
])
def test_rms_norm_kernel_matches_reference(shape, x_dtype, out_dtype):
    gen = torch.Generator(device="cuda").manual_seed(shape[1])
    x = (3 * torch.randn(*shape, device="cuda", generator=gen)).to(x_dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=gen)).requires_grad_()
    g = torch.randn(*shape, device="cuda", generator=gen).to(out_dtype)
    y = ops.rms_norm(x, w, 1e-6, out_dtype, backend="triton")
    dx, dw = torch.autograd.grad(y, (x, w), g)
    y_r = ops.rms_norm(x, w, 1e-6, out_dtype, backend="reference")
    dx_r, dw_r = torch.autograd.grad(y_r, (x, w), g)
    assert y.dtype == out_dtype and dx.dtype == x_dtype and dw.dtype == torch.float32
    low = torch.bfloat16 in (x_dtype, out_dtype)
    tol = dict(rtol=1.6e-2, atol=1e-2) if low else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_r, **tol)
    torch.testing.assert_close(dx, dx_r, **tol)
    torch.testing.assert_close(dw, dw_r, rtol=1e-4 if not low else 2e-3, atol=1e-3)


def test_auto_keeps_the_reference_until_switched():
    from hybrid_lm.ops.triton import prefer_rms_norm_kernel

    dev = torch.device("cuda")
    assert backends.resolve_backend("rms_norm", "auto", dev, torch.float32) == "reference"
    try:
        prefer_rms_norm_kernel(True)
        assert backends.resolve_backend("rms_norm", "auto", dev, torch.float32) == "triton"
        assert backends.resolve_backend("rms_norm", "auto", dev, torch.float64) == "reference"
    finally:
        prefer_rms_norm_kernel(False)
