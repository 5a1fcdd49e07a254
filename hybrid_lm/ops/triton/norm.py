"""Triton kernels for RMSNorm (the ``rms_norm`` op's ``triton`` backend).

Forward: one program normalises BLOCK_ROWS rows of x [N, D] (any float dtype, read once), computes in fp32 and
stores y in the requested dtype (bf16 for the blocks under autocast), plus rstd [N] (fp32) for the backward.
Backward: each program walks a contiguous range of row tiles; per row

    x_hat = x * rstd,  g = dy * w,  dx = rstd * (g - x_hat * mean(g * x_hat))

stored in x's dtype, while dw's partial sum of dy * x_hat over the program's rows stays in registers and is written
once per program ([programs, D] fp32, summed by PyTorch). The reference instead makes fp32 copies of x and dy and
reads them again for the weight gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, n_rows, D, eps, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(X, W, DY, RSTD, DX, DW, n_rows, D, tiles_per_program,
                    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(tiles_per_program):
        rows = (pid * tiles_per_program + i) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / D
        dx = rstd[:, None] * (g - x_hat * c[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW + pid.to(tl.int64) * D + cols, dw, mask=cmask)


def _tiles(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, min(64, 4096 // block_d)), block_d  # ~4k fp32 values a tile: no register spills up to D = 8192


def rms_norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """y [N, D] (out_dtype), rstd [N] (fp32) for a contiguous x2 [N, D]."""
    N, D = x2.shape
    y = torch.empty(N, D, device=x2.device, dtype=out_dtype)
    rstd = torch.empty(N, device=x2.device, dtype=torch.float32)
    if N:
        block_rows, block_d = _tiles(D)
        _rms_fwd_kernel[(triton.cdiv(N, block_rows),)](x2, weight, y, rstd, N, D, eps, BLOCK_ROWS=block_rows,
                                                       BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8)
    return y, rstd


def rms_norm_backward(x2, weight, dy2, rstd):
    """dx [N, D] (x2's dtype) and dw [D] (weight's dtype)."""
    N, D = x2.shape
    dx = torch.empty_like(x2)
    block_rows, block_d = _tiles(D)
    tiles = triton.cdiv(N, block_rows)
    programs = max(1, min(tiles, 4 * _sm_count(x2.device)))
    per_program = triton.cdiv(tiles, programs)
    programs = triton.cdiv(tiles, per_program)
    partial = torch.empty(programs, D, device=x2.device, dtype=torch.float32)
    if N:
        _rms_bwd_kernel[(programs,)](x2, weight, dy2, rstd, dx, partial, N, D, per_program, BLOCK_ROWS=block_rows,
                                     BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8)
    else:
        partial.zero_()
    return dx, partial.sum(0).to(weight.dtype)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the Triton interpreter (CPU tests)
    return torch.cuda.get_device_properties(device).multi_processor_count


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        w = weight.contiguous()
        y, rstd = rms_norm_forward(x2, w, eps, out_dtype)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(x2, w, dy.reshape(x2.shape).contiguous(), rstd)
        return dx.view(ctx.shape), dw, None, None


def rms_norm_triton(x, weight, eps, out_dtype):
    """Backend entry point with the op's signature (minus ``backend``)."""
    return RMSNormFunction.apply(x, weight, eps, out_dtype)
