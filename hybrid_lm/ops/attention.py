"""Dense softmax attention (Vaswani et al. 2017) with GQA/MQA, sliding windows and packed documents.

Layout is fla/flash-attn's: q ``[B, Tq, HQ, D]``, k ``[B, Tk, HKV, D]``, v ``[B, Tk, HKV, DV]``,
output ``[B, Tq, HQ, DV]``. Query head ``h`` reads kv head ``h // G`` with ``G = HQ // HKV``.
The ``Tq`` queries are the last ``Tq`` positions of the key sequence (bottom-right causal
alignment, as flash-attn), so decoding with a KV cache is ``Tq = 1``.

Backends: ``"reference"`` (pure PyTorch, chunked over queries, scores in fp32),
``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``; explicit masks where its
top-left ``is_causal`` would be wrong) and ``"flash_attn"`` (flash-attn 2 or 4, CUDA, bf16/fp16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .backends import (
    HALF_DTYPES,
    check_cu_seqlens,
    compute_dtype,
    get_backend,
    has_flash_attn,
    register_backend,
    resolve_backend,
    without_autocast,
)

__all__ = ["attention"]

# Queries per block in the reference; the block is shrunk so its score tensor stays under
# SCORE_BUDGET elements. Tests lower these to cross block boundaries.
QUERY_CHUNK = 256
SCORE_BUDGET = 1 << 26


def attention(q, k, v, *, causal=True, scale=None, window=None, cu_seqlens=None, backend="auto"):
    """Softmax attention. See the module docstring for shapes and alignment.

    window: sliding window ``w``; the query at absolute position ``t`` sees keys ``s`` with
        ``t - w < s <= t``. Needs ``causal=True``. ``None`` = unlimited.
    cu_seqlens: ``[N+1]`` int32/int64 cumulative document lengths for packed documents
        (requires ``B == 1`` and ``Tq == Tk``); no token attends across documents.
    scale: defaults to ``D ** -0.5``.
    """
    _check_inputs(q, k, v, causal, window, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    features = {
        "device": q.device, "head_dim": q.shape[-1], "head_dim_v": v.shape[-1], "causal": causal,
        "window": window, "varlen": cu_seqlens is not None, "requires_grad": _needs_grad(q, k, v),
    }
    name = resolve_backend("attention", backend, q.device, q.dtype, features=features)
    fn = get_backend("attention", name)
    return fn(q, k, v, causal=causal, scale=scale, window=window, cu_seqlens=cu_seqlens)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_inputs(q, k, v, causal, window, cu_seqlens) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    (B, Tq, HQ, D), (Bk, Tk, HKV, Dk) = q.shape, k.shape
    if Bk != B or v.shape[:3] != k.shape[:3] or Dk != D:
        raise ValueError(
            f"attention: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(need k [B, Tk, HKV, D] and v [B, Tk, HKV, DV])"
        )
    if HQ % HKV != 0:
        raise ValueError(f"attention: query heads ({HQ}) must be a multiple of key/value heads ({HKV})")
    if Tq > Tk:
        raise ValueError(f"attention: Tq ({Tq}) > Tk ({Tk}); queries must be the last Tq key positions")
    if window is not None:
        if not causal:
            raise ValueError("attention: window needs causal=True (a window bounds how far back a query looks)")
        if int(window) < 1:
            raise ValueError(f"attention: window must be >= 1 or None, got {window}")
    if cu_seqlens is not None and (B != 1 or Tq != Tk):
        raise ValueError(f"attention: cu_seqlens needs B == 1 and Tq == Tk, got B={B}, Tq={Tq}, Tk={Tk}")


def _per_document(fn, q, k, v, cu_seqlens, **kw):
    offsets = check_cu_seqlens(cu_seqlens, q.shape[1], "attention")
    outs = [fn(q[:, s:e], k[:, s:e], v[:, s:e], **kw) for s, e in zip(offsets, offsets[1:]) if e > s]
    if not outs:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    return torch.cat(outs, dim=1)


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """[c, L] bool: may the query at absolute position q_pos[i] see the key at k_pos[j]?"""
    allowed = torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)
    if causal:
        allowed &= k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def _key_range(t0: int, t1: int, offset: int, Tk: int, causal: bool, window: int | None) -> tuple[int, int]:
    """Keys [lo, hi) that queries t0..t1-1 (absolute positions offset+t) can see."""
    hi = min(Tk, offset + t1) if causal else Tk
    lo = max(0, offset + t0 - window + 1) if window is not None else 0
    return lo, hi


def _reference_block(qc, kc, vc, allowed, scale):
    B, c, HQ, D = qc.shape
    HKV = kc.shape[2]
    cdt = compute_dtype(qc.dtype)
    qg = qc.to(cdt).view(B, c, HKV, HQ // HKV, D)  # [B, c, HKV, G, D]
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, kc.to(cdt)) * scale  # [B, HKV, G, c, L]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    o = torch.einsum("bhgqk,bkhd->bqhgd", p, vc.to(cdt))  # [B, c, HKV, G, DV]
    return o.reshape(B, c, HQ, vc.shape[-1]).to(qc.dtype)


def _reference_dense(q, k, v, *, causal, scale, window):
    B, Tq, HQ, _ = q.shape
    Tk = k.shape[1]
    offset = Tk - Tq
    chunk = max(1, min(QUERY_CHUNK, SCORE_BUDGET // max(1, B * HQ * Tk)))
    # Recompute blocks in backward when there are several, so backward memory stays per block too.
    remat = Tq > chunk and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for t0 in range(0, Tq, chunk):
        t1 = min(Tq, t0 + chunk)
        lo, hi = _key_range(t0, t1, offset, Tk, causal, window)
        q_pos = torch.arange(offset + t0, offset + t1, device=q.device)
        allowed = _visible(q_pos, torch.arange(lo, hi, device=q.device), causal, window)
        args = (q[:, t0:t1], k[:, lo:hi], v[:, lo:hi], allowed, scale)
        outs.append(checkpoint(_reference_block, *args, use_reentrant=False) if remat else _reference_block(*args))
    return torch.cat(outs, dim=1)


@without_autocast
def _attention_reference(q, k, v, *, causal, scale, window, cu_seqlens):
    kw = dict(causal=causal, scale=scale, window=window)
    if cu_seqlens is not None:
        return _per_document(_reference_dense, q, k, v, cu_seqlens, **kw)
    return _reference_dense(q, k, v, **kw)


def _sdpa(q, k, v, mask, scale, is_causal=False):
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H, T, D]
        attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)  # [B, Tq, HQ, DV]


def _sdpa_dense(q, k, v, *, causal, scale, window):
    Tq, Tk = q.shape[1], k.shape[1]
    if not causal or (window is None and Tq == 1):
        return _sdpa(q, k, v, None, scale)
    if window is None and Tq == Tk:
        return _sdpa(q, k, v, None, scale, is_causal=True)
    # SDPA's is_causal is top-left aligned when Tq != Tk, so build bottom-right masks per query block.
    offset, chunk = Tk - Tq, max(1, min(QUERY_CHUNK, SCORE_BUDGET // max(1, q.shape[0] * q.shape[2] * Tk)))
    outs = []
    for t0 in range(0, Tq, chunk):
        t1 = min(Tq, t0 + chunk)
        lo, hi = _key_range(t0, t1, offset, Tk, causal, window)
        q_pos = torch.arange(offset + t0, offset + t1, device=q.device)
        allowed = _visible(q_pos, torch.arange(lo, hi, device=q.device), causal, window)
        outs.append(_sdpa(q[:, t0:t1], k[:, lo:hi], v[:, lo:hi], allowed, scale))
    return torch.cat(outs, dim=1)


def _attention_sdpa(q, k, v, *, causal, scale, window, cu_seqlens):
    kw = dict(causal=causal, scale=scale, window=window)
    if cu_seqlens is not None:
        return _per_document(_sdpa_dense, q, k, v, cu_seqlens, **kw)
    return _sdpa_dense(q, k, v, **kw)


def _attention_flash(q, k, v, *, causal, scale, window, cu_seqlens):
    kind = has_flash_attn()
    if kind == "fa4":
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

        window_size = (window - 1, 0) if window is not None else (None, None)
    else:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        window_size = (window - 1, 0) if window is not None else (-1, -1)
    kw = dict(softmax_scale=scale, causal=causal, window_size=window_size)
    if cu_seqlens is None:
        out = flash_attn_func(q, k, v, **kw)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        out = flash_attn_varlen_func(  # keywords: FA4 inserted extra positional parameters
            q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, **kw
        )
    out = out[0] if isinstance(out, tuple) else out  # FA4 returns (out, lse)
    return out if cu_seqlens is None else out.unsqueeze(0)  # [1, T, HQ, DV]


def _flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in HALF_DTYPES and has_flash_attn() is not None


def _flash_supports(features: dict) -> str | None:
    d, dv, kind = features["head_dim"], features["head_dim_v"], has_flash_attn()
    major, minor = torch.cuda.get_device_capability(features["device"])
    if kind == "fa4":
        if major not in (9, 10, 11):
            return f"flash-attn 4 needs an sm90+ GPU (Hopper/Blackwell), this one is sm{major}{minor}"
        if not (d == dv and d in (64, 96, 128)) and (d, dv) != (192, 128):
            return f"flash-attn 4 supports head dims 64/96/128 (or 192/128), got q/k {d}, v {dv}"
        return None
    if major < 8:
        return f"flash-attn 2 needs an sm80+ GPU, this one is sm{major}{minor}"
    if d != dv or d > 256 or d % 8:
        return f"flash-attn 2 needs equal q/k and v head dims, a multiple of 8 and <= 256; got {d}, {dv}"
    return None


register_backend("attention", "reference", _attention_reference, priority=0)
register_backend("attention", "sdpa", _attention_sdpa, priority=50)
register_backend(
    "attention", "flash_attn", _attention_flash, _flash_available, priority=100,
    requires="a CUDA device, bf16/fp16 inputs and flash-attn (pip install flash-attn-4, or flash-attn for FA2)",
    supports=_flash_supports,
)
