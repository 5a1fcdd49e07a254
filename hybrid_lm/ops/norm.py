"""RMSNorm (Zhang & Sennrich 2019) as an op: ``rms_norm(x, weight, eps, out_dtype)`` normalises the last dim of
``x [..., D]`` in fp32 and scales it by ``weight [D]``:

    y = x * rsqrt(mean(x^2) + eps) * weight,   returned in ``out_dtype`` (default x's dtype)

Backends: ``reference`` (torch's ``F.rms_norm`` on fp32 copies, then a cast: on CUDA one kernel each way for the
norm plus separate kernels for the casts and the weight gradient) and ``triton`` (one kernel forward that reads x
in its own dtype and writes ``out_dtype``; one backward that writes dx and per-program weight-gradient partials;
ops/triton/norm.py). Only fp32 math whatever the dtypes: fp64 inputs are computed in fp32 by both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import get_backend, register_backend, resolve_backend

__all__ = ["rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None, *,
             backend: str = "auto") -> torch.Tensor:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight [D] must match x's last dim; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    out_dtype = out_dtype or x.dtype
    name = resolve_backend("rms_norm", backend, x.device, x.dtype)
    return get_backend("rms_norm", name)(x, weight, eps, out_dtype)


def _rms_norm_reference(x, weight, eps, out_dtype):
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(out_dtype)


register_backend("rms_norm", "reference", _rms_norm_reference)
