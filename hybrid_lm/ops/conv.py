"""Depthwise causal 1-D convolution: the short convolution in front of Gated DeltaNet / Mamba mixers.

Output ``y[t] = act(bias + sum_i weight[:, W-1-i] * x[t-i])`` for ``i < W``: token ``t`` sees
``x[t-W+1..t]`` of its own sequence. Shapes: x ``[B, T, C]`` (C channels), weight ``[C, W]``,
bias ``[C]``; with ``cu_seqlens`` (``B == 1``) the packed documents never mix.

The state ``[N, C, W-1]`` holds each sequence's last ``W-1`` raw inputs (oldest first,
zero-padded on the left for short sequences), so a sequence can be continued, e.g. decoded one
token at a time, from it exactly as if it had been processed in one pass.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .backends import (
    check_cu_seqlens,
    compute_dtype,
    get_backend,
    has_fla,
    register_backend,
    resolve_backend,
    without_autocast,
)

__all__ = ["causal_conv1d"]

_ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d(
    x, weight, bias=None, *, activation="silu", cu_seqlens=None, initial_state=None,
    output_final_state=False, backend="auto",
):
    """Causal depthwise conv. Returns ``(y [B, T, C], final_state [N, C, W-1] or None)``.

    activation: ``"silu"`` (alias ``"swish"``) or ``None``. ``initial_state`` rows are per
    sequence: ``N = B``, or the number of documents with ``cu_seqlens``.
    """
    _check_inputs(x, weight, bias, activation, cu_seqlens, initial_state)
    features = {"device": x.device, "width": weight.shape[1], "varlen": cu_seqlens is not None}
    name = resolve_backend("causal_conv1d", backend, x.device, x.dtype, features=features)
    fn = get_backend("causal_conv1d", name)
    return fn(
        x, weight, bias, activation=activation, cu_seqlens=cu_seqlens,
        initial_state=initial_state, output_final_state=output_final_state,
    )


def _check_inputs(x, weight, bias, activation, cu_seqlens, initial_state) -> None:
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"causal_conv1d: need x [B, T, C] and weight [C, W]; got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    C, W = weight.shape
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"causal_conv1d: bias must be [C] = [{C}], got {tuple(bias.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(f"causal_conv1d: cu_seqlens needs B == 1 (flatten the documents), got B={x.shape[0]}")
    n_seq = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_seq, C, W - 1):
        raise ValueError(
            f"causal_conv1d: initial_state must be [N, C, W-1] = {[n_seq, C, W - 1]}, got {tuple(initial_state.shape)}"
        )


def _finish(y, bias, activation, dtype):
    if bias is not None:
        y = y + bias.to(y.dtype)
    if activation is not None:
        y = F.silu(y)
    return y.to(dtype)


def _conv_batched(x, weight, bias, activation, initial_state, output_final_state):
    B, T, C = x.shape
    W = weight.shape[1]
    cdt = compute_dtype(x.dtype)
    history = x.new_zeros(B, C, W - 1) if initial_state is None else initial_state.to(x.dtype)
    xe = torch.cat([history, x.transpose(1, 2)], dim=2)  # [B, C, W-1+T]
    if T == 0:
        return x.new_zeros(B, 0, C), history if output_final_state else None
    y = F.conv1d(xe.to(cdt), weight.to(cdt)[:, None, :], groups=C)  # [B, C, T]
    final = xe[:, :, xe.shape[2] - (W - 1):] if output_final_state else None
    return _finish(y.transpose(1, 2), bias, activation, x.dtype), final


def _conv_packed(x, weight, bias, activation, initial_state, output_final_state, offsets):
    """Documents packed in x [1, T, C]: shift-and-add over the W taps, reading the state before a document's start."""
    T, C = x.shape[1], x.shape[2]
    W = weight.shape[1]
    cdt = compute_dtype(x.dtype)
    dev = x.device
    lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=dev)
    starts = torch.tensor(offsets[:-1], device=dev)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths)  # [T]
    local = torch.arange(T, device=dev) - starts[doc]  # position within the document
    xs = x[0].to(cdt)
    hist = x.new_zeros(len(lengths), C, W - 1) if initial_state is None else initial_state
    # One extra zero column keeps the gathers below in range when W == 1 (no state at all).
    hist = torch.cat([hist.transpose(1, 2).to(cdt), xs.new_zeros(len(lengths), 1, C)], dim=1)  # [N, W, C]

    def input_at(d, rel):
        """Input of document d at relative position rel; negative rel reads the carried state."""
        from_x = xs[(starts[d] + rel).clamp(0, max(T - 1, 0))]
        from_state = hist[d, (W - 1 + rel).clamp(0, W - 1)]
        return torch.where((rel >= 0)[..., None], from_x, from_state)

    y = sum(input_at(doc, local - i) * weight[:, W - 1 - i].to(cdt) for i in range(W))  # [T, C]
    final = None
    if output_final_state:
        rel = lengths[:, None] - (W - 1) + torch.arange(W - 1, device=dev)[None, :]  # [N, W-1]
        final = input_at(torch.arange(len(lengths), device=dev)[:, None], rel)  # [N, W-1, C]
        final = final.transpose(1, 2).to(x.dtype)  # [N, C, W-1]
    return _finish(y[None], bias, activation, x.dtype), final


@without_autocast
def _conv_reference(x, weight, bias, *, activation, cu_seqlens, initial_state, output_final_state):
    if cu_seqlens is None:
        return _conv_batched(x, weight, bias, activation, initial_state, output_final_state)
    offsets = check_cu_seqlens(cu_seqlens, x.shape[1], "causal_conv1d")
    return _conv_packed(x, weight, bias, activation, initial_state, output_final_state, offsets)


def _fla_conv():
    # The module moved across fla releases; 0.6 has fla.modules.causal_conv1d.
    for path in ("fla.modules.causal_conv1d", "fla.modules.conv", "fla.modules.convolution"):
        try:
            return importlib.import_module(path).causal_conv1d
        except (ImportError, AttributeError):
            continue
    raise ImportError("this fla has no causal_conv1d (looked in fla.modules.causal_conv1d, .conv, .convolution)")


def _conv_fla(x, weight, bias, *, activation, cu_seqlens, initial_state, output_final_state):
    # fla keeps W slots per state, the oldest one unused; ours keeps the W-1 that matter.
    h0 = None if initial_state is None else F.pad(initial_state, (1, 0))
    y, final = _fla_conv()(
        x=x, weight=weight, bias=bias, initial_state=h0, output_final_state=output_final_state,
        activation=activation, cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )
    return y, None if final is None else final[..., 1:]


def _fla_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and has_fla()


register_backend("causal_conv1d", "reference", _conv_reference, priority=0)
register_backend(
    "causal_conv1d", "fla", _conv_fla, _fla_available, priority=100,
    requires="a CUDA device and fla (pip install flash-linear-attention)",
)
