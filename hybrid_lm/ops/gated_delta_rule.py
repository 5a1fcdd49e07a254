"""Gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024, arXiv 2412.06464), fla semantics.

Per head a state ``S [K, V]`` evolves token by token::

    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T
    o_t = S_t^T (scale * q_t)

Shapes (fla's layout): q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g (log decay, <= 0) and beta
``[B, T, H]``, states ``[N, H, K, V]`` with ``N = B``, or ``N`` = number of documents when
``cu_seqlens`` packs documents into ``B == 1``.

Backends: ``"recurrent"`` (the loop above; ground truth), ``"reference"`` (chunked WY/UT form,
chunks of C = 64 tokens, fp32, O(T * C) memory) and ``"fla"`` (fla's Triton kernel; CUDA).

Chunked form, per chunk with cumulative log decay ``gamma_i`` and entering state ``S_0``: the
delta-rule updates ``u_i = beta_i (v_i - k_i^T S_{i-1}')`` solve the unit-lower-triangular system
``(I + A) U = beta V - beta exp(gamma) K S_0`` with ``A_ij = beta_i exp(gamma_i - gamma_j) k_i.k_j``
(j < i). Writing ``U = U' - W S_0`` splits it into a part computed for all chunks at once and a
small per-chunk correction in the sequential state pass.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from .backends import (
    check_cu_seqlens,
    compute_dtype,
    get_backend,
    has_fla,
    register_backend,
    resolve_backend,
    without_autocast,
)

__all__ = ["gated_delta_rule"]

CHUNK_SIZE = 64
FLA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
    cu_seqlens=None, use_qk_l2norm=False, backend="auto",
):
    """Gated delta rule over a sequence; same semantics as fla's ``chunk_gated_delta_rule``.

    Returns ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state ``[N, H, K, V]``
    in fp32 (fp64 for fp64 inputs) if ``output_final_state`` else ``None``.
    ``scale`` defaults to ``K ** -0.5``; ``use_qk_l2norm`` L2-normalises q and k over K first.
    """
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = (q, k, v, g, beta, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    features = {
        "device": q.device, "head_dim": q.shape[-1], "head_dim_v": v.shape[-1],
        "varlen": cu_seqlens is not None, "requires_grad": needs_grad,
    }
    name = resolve_backend("gated_delta_rule", backend, q.device, q.dtype, features=features)
    if backend == "auto" and q.shape[1] == 1 and name == "reference":
        name = "recurrent"  # one decoding step: the plain update is cheaper than chunk set-up
    fn = get_backend("gated_delta_rule", name)
    return fn(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
    )


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "gated_delta_rule: need q, k [B, T, H, K] and v [B, T, H, V]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, T, H, K = q.shape
    if tuple(g.shape) != (B, T, H) or tuple(beta.shape) != (B, T, H):
        raise ValueError(
            f"gated_delta_rule: g and beta must be [B, T, H] = {[B, T, H]}, got {tuple(g.shape)}, {tuple(beta.shape)}"
        )
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"gated_delta_rule: cu_seqlens needs B == 1 (flatten the documents), got B={B}")
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_seq, H, K, v.shape[-1]):
        raise ValueError(
            f"gated_delta_rule: initial_state must be [N, H, K, V] = {[n_seq, H, K, v.shape[-1]]} "
            f"(N = {'documents' if cu_seqlens is not None else 'batch'}), got {tuple(initial_state.shape)}"
        )


def _prepare(q, k, v, g, beta, use_qk_l2norm):
    """Cast to the compute dtype and optionally L2-normalise q and k (fla's eps)."""
    cdt = compute_dtype(q.dtype)
    q, k, v, g, beta = (t.to(cdt) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    return q, k, v, g, beta


def _recurrent_loop(q, k, v, g, beta, scale, state):
    """Token-by-token update over [B, T, H, *] inputs from state [B, H, K, V]."""
    outs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        k_t = k[:, t]  # [B, H, K]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, state))
        state = state + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, state


@without_autocast
def _gdr_recurrent(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
    B, T, H, K = q.shape
    zeros = q.new_zeros(B if cu_seqlens is None else cu_seqlens.numel() - 1, H, K, v.shape[-1])
    h0 = zeros if initial_state is None else initial_state.to(q.dtype)
    if cu_seqlens is None:
        o, final = _recurrent_loop(q, k, v, g, beta, scale, h0)
        return o.to(out_dtype), final if output_final_state else None
    offsets = check_cu_seqlens(cu_seqlens, T, "gated_delta_rule")
    outs, finals = [], []
    for n, (s, e) in enumerate(zip(offsets, offsets[1:])):
        o_n, f_n = _recurrent_loop(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], scale, h0[n:n + 1])
        outs.append(o_n)
        finals.append(f_n)
    return torch.cat(outs, dim=1).to(out_dtype), torch.cat(finals) if output_final_state else None


def _chunk_layout(offsets: list[int], C: int, device):
    """Pad every document to a multiple of C so that each chunk belongs to one document.

    Returns (src [P] gather index into tokens, with T meaning a zero pad row; dst [T] padded
    position of each token; per-chunk document id, first-chunk and last-chunk flags).
    """
    src, dst, doc, first, last = [], [], [], [], []
    total = offsets[-1]
    for n, (s, e) in enumerate(zip(offsets, offsets[1:])):
        n_chunks = -(-(e - s) // C)
        base = len(src)
        src.extend(range(s, e))
        src.extend([total] * (n_chunks * C - (e - s)))
        dst.extend(range(base, base + e - s))
        doc.extend([n] * n_chunks)
        first.extend([True] + [False] * (n_chunks - 1) if n_chunks else [])
        last.extend([False] * (n_chunks - 1) + [True] if n_chunks else [])
    src_t = torch.tensor(src, dtype=torch.long, device=device)
    dst_t = torch.tensor(dst, dtype=torch.long, device=device)
    return src_t, dst_t, doc, first, last


def _to_chunks(x, src, C):
    """[B, T, H, ...] -> [B, NC, H, C, ...] in the padded chunk layout (pads are zeros)."""
    pad = x.new_zeros(x.shape[0], 1, *x.shape[2:])
    xp = torch.cat([x, pad], dim=1)[:, src]  # [B, NC*C, H, ...]
    xp = xp.view(x.shape[0], -1, C, *x.shape[2:])  # [B, NC, C, H, ...]
    return xp.transpose(2, 3)  # [B, NC, H, C, ...]


def _intra_chunk(q, k, v, g, beta, scale):
    """Everything that does not depend on the entering state, for all chunks at once.

    Inputs [B, NC, H, C, *]; returns decayed scaled queries, W, U', the masked intra-chunk
    q.k scores, keys decayed to the chunk end, and the total chunk decay.
    """
    C = q.shape[-2]
    gamma = g.cumsum(-1)  # [B, NC, H, C]
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    incl, strict = ones.tril(), ones.tril(-1)
    # Mask before exp: the upper triangle holds positive differences that could overflow.
    diff = gamma[..., :, None] - gamma[..., None, :]
    decay = diff.masked_fill(~incl, float("-inf")).exp()  # [B, NC, H, C, C]
    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2)) * decay.masked_fill(~strict, 0.0)
    lhs = torch.eye(C, dtype=q.dtype, device=q.device) + A  # unit lower triangular

    def solve(rhs):
        return torch.linalg.solve_triangular(lhs, rhs, upper=False, unitriangular=True)

    w = solve(kb * gamma.exp()[..., None])  # [B, NC, H, C, K]
    u = solve(v * beta[..., None])  # [B, NC, H, C, V]
    qk = (q @ k.transpose(-1, -2)) * decay * scale  # [B, NC, H, C, C]
    q_dec = q * gamma.exp()[..., None] * scale
    g_end = gamma[..., -1]  # [B, NC, H]
    k_end = k * (g_end[..., None] - gamma).exp()[..., None]  # [B, NC, H, C, K]
    return q_dec, w, u, qk, k_end, g_end


@without_autocast
def _gdr_chunked(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
    B, T, H, K = q.shape
    V, C = v.shape[-1], CHUNK_SIZE
    offsets = [0, T] if cu_seqlens is None else check_cu_seqlens(cu_seqlens, T, "gated_delta_rule")
    src, dst, doc, first, last = _chunk_layout(offsets, C, q.device)
    q_dec, w, u0, qk, k_end, g_end = _intra_chunk(
        *(_to_chunks(x, src, C) for x in (q, k, v)), *(_to_chunks(x, src, C) for x in (g, beta)), scale
    )
    # Start states as [B, docs per row, H, K, V]: one document per row, or all documents in row 0.
    if initial_state is None:
        h0 = q.new_zeros(B, len(offsets) - 1, H, K, V)
    else:
        h0 = initial_state.to(q.dtype)
        h0 = h0[:, None] if cu_seqlens is None else h0[None]
    finals = list(h0.unbind(1))
    state, outs = None, []
    for c in range(len(doc)):
        if first[c]:
            state = h0[:, doc[c]]
        u = u0[:, c] - w[:, c] @ state  # [B, H, C, V]
        outs.append(q_dec[:, c] @ state + qk[:, c] @ u)
        state = g_end[:, c].exp()[..., None, None] * state + k_end[:, c].transpose(-1, -2) @ u
        if last[c]:
            finals[doc[c]] = state
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, C, V)  # [B, NC, H, C, V]
    o = o.transpose(2, 3).reshape(B, -1, H, V)[:, dst]  # [B, T, H, V]
    if not output_final_state:
        return o.to(out_dtype), None
    final = torch.stack(finals, dim=1)  # [B, docs per row, H, K, V]
    return o.to(out_dtype), final[:, 0] if cu_seqlens is None else final[0]


def _gdr_fla(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    o, final = chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )
    return o, None if final is None else final.float()


def _fla_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in FLA_DTYPES and has_fla()


@functools.cache
def _fla_backward_blocker() -> str | None:
    """fla 0.6 raises in the gated backward on Hopper with triton 3.4-3.7.0 unless tilelang is there.

    Reads fla's own flags, so the rule follows the installed fla; versions without them pass.
    """
    try:
        chunk_o = importlib.import_module("fla.ops.common.chunk_o")
        blocked = chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0 and not chunk_o.TRITON_ABOVE_3_7_1
    except (ImportError, AttributeError):
        return None
    if blocked and importlib.util.find_spec("tilelang") is None:
        return (
            "fla refuses the gated delta rule backward on Hopper GPUs with triton >= 3.4, < 3.7.1 "
            "(fla issue #640); upgrade triton to >= 3.7.1 or pip install tilelang"
        )
    return None


def _fla_supports(features: dict) -> str | None:
    return _fla_backward_blocker() if features.get("requires_grad") else None


register_backend("gated_delta_rule", "recurrent", _gdr_recurrent, priority=0)
register_backend("gated_delta_rule", "reference", _gdr_chunked, priority=10)
register_backend(
    "gated_delta_rule", "fla", _gdr_fla, _fla_available, priority=100,
    requires="a CUDA device, bf16/fp16/fp32 inputs and fla >= 0.6 (pip install flash-linear-attention)",
    supports=_fla_supports,
)
