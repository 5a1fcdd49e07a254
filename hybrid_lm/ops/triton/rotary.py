"""Triton kernel for rotary position embeddings (the ``rotary`` op's ``triton`` backend).

One program rotates BLOCK_ROWS (token, head) rows: it loads both halves of a row's rotated dims and its token's
cos / sin halves, computes in fp32 and stores in x's dtype, so the rotation is one read and one write of x
(the PyTorch reference makes six passes, several in fp32). The backward is the same kernel with the transposed
rotation (BACKWARD): dx1 = g1 cos1 + g2 sin2, dx2 = g2 cos2 - g1 sin1. Dims past R are copied by PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    X, C, S, Y, n_rows, T, H, sx_b, sx_t, sx_h, sc_b, sc_t, sy_b, sy_t, sy_h,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr, BACKWARD: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    rmask = rows < n_rows
    h = rows % H
    t = (rows // H) % T
    b = (rows // H // T).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    mask = rmask[:, None] & (j[None, :] < HALF)
    xrow = X + b[:, None] * sx_b + t[:, None].to(tl.int64) * sx_t + h[:, None] * sx_h + j[None, :]
    crow = b[:, None] * sc_b + t[:, None].to(tl.int64) * sc_t + j[None, :]
    x1 = tl.load(xrow, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xrow + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(C + crow, mask=mask, other=0.0)
    c2 = tl.load(C + crow + HALF, mask=mask, other=0.0)
    s1 = tl.load(S + crow, mask=mask, other=0.0)
    s2 = tl.load(S + crow + HALF, mask=mask, other=0.0)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    yrow = Y + b[:, None] * sy_b + t[:, None].to(tl.int64) * sy_t + h[:, None] * sy_h + j[None, :]
    tl.store(yrow, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(yrow + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """y [B, T, H, D] (x's dtype): x's first R dims rotated (or, `backward`, rotated back), the rest copied."""
    B, T, H, D = x.shape
    R = cos.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    y = torch.empty(B, T, H, D, device=x.device, dtype=x.dtype)
    if R < D:
        y[..., R:] = x[..., R:]
    n_rows = B * T * H
    if n_rows == 0:
        return y
    half = R // 2
    block_half = max(16, triton.next_power_of_2(half))
    block_rows = max(1, 2048 // block_half)
    _rotary_kernel[(triton.cdiv(n_rows, block_rows),)](
        x, cos, sin, y, n_rows, T, H, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        y.stride(0), y.stride(1), y.stride(2),
        HALF=half, BLOCK_HALF=block_half, BLOCK_ROWS=block_rows, BACKWARD=backward, num_warps=4,
    )
    return y


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_launch(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotary_launch(dy, cos, sin, backward=True), None, None


def rotary_triton(x, cos, sin):
    """Backend entry point with the op's signature (minus ``backend``); cos / sin get no gradient."""
    return RotaryFunction.apply(x, cos, sin)
