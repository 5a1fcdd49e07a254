"""RMSNorm alone: torch's F.rms_norm on fp32 copies plus casts (the op's reference) against the Triton kernel that
reads x once and writes the matmul dtype (ops.rms_norm's "triton"), forward and forward + backward.

Shapes as the zoo's blocks see them: the fp32 residual stream of 16,384 tokens normalised into bf16 at hidden
sizes 768, 1024 and 2048, and bf16 q/k heads ([16384, 16, 64] -> bf16). Usage (GPU):

    python benchmarks/bench_norm.py        # writes $OUT/norm.json (or benchmarks/results/norm.json)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_ms, print_table, row, save  # noqa: E402

from hybrid_lm import ops  # noqa: E402

SHAPES = (((16384, 768), torch.float32), ((16384, 1024), torch.float32), ((16384, 2048), torch.float32),
          ((16384, 16, 64), torch.bfloat16))


def main(argv=None) -> list:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    rows = []
    for shape, dtype in SHAPES:
        x = torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.ones(shape[-1], device="cuda", requires_grad=True)
        g = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        for backend in ("reference", "triton"):
            def fwd():
                return ops.rms_norm(x, w, 1e-6, torch.bfloat16, backend=backend)

            def fwdbwd():
                torch.autograd.grad(fwd(), (x, w), g)

            gb = x.numel() * (x.element_size() + 2) / 1e9  # one read of x, one bf16 write: the forward's floor
            f_ms, fb_ms = bench_ms(fwd), bench_ms(fwdbwd)
            rows.append(row("rms_norm", backend, shape[0], fwd_ms=f_ms, fwdbwd_ms=fb_ms, shape=list(shape),
                            x_dtype=str(dtype).replace("torch.", ""), fwd_gb_per_s=gb / (f_ms / 1e3)))
    print_table(rows, ("op", "impl", "shape", "x_dtype", "fwd_ms", "fwdbwd_ms", "fwd_gb_per_s"))
    save(rows, "norm")
    return rows


if __name__ == "__main__":
    main()
