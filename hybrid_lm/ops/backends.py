"""Backend registry for the stateless ops: the one place optional dependencies are detected.

Every op (``attention``, ``lightning_indexer_topk``, ``sparse_attention``, ``gated_delta_rule``,
``causal_conv1d``) has a pure-PyTorch ``"reference"`` and may have faster implementations
(fla's Triton kernels, flash-attn, torch SDPA, project kernels). Implementations register
here with an availability predicate and a priority; ``backend="auto"`` takes the available
one with the highest priority, an explicitly named backend that cannot run raises
``ValueError`` (never a silent fallback).

Detection is lazy and cached: importing this module imports no optional package and queries
no device. A kernel author adds an implementation without touching the op files::

    register_backend("lightning_indexer_topk", "triton", my_topk,
                     available=lambda device, dtype: device.type == "cuda" and has_triton(),
                     priority=100, requires="a CUDA device and triton")

The registered ``fn`` is called with the op's own arguments minus ``backend``, after the op has
validated them and resolved defaults (``scale`` is a float, ``topk`` an int). It returns what the
op returns, except that ``sparse_attention`` backends always return ``(o, lse)``.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = [
    "has_fla",
    "has_flash_attn",
    "has_triton",
    "register_backend",
    "resolve_backend",
    "get_backend",
    "list_backends",
    "compute_dtype",
    "check_cu_seqlens",
    "autocast_off",
    "without_autocast",
]

logger = logging.getLogger("hybrid_lm")

HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def has_fla() -> bool:
    """True if flash-linear-attention (``fla``) imports, with its gated delta rule kernels."""
    try:
        importlib.import_module("fla.ops.gated_delta_rule")
    except Exception:  # a broken install (e.g. triton without a GPU) counts as absent
        return False
    return True


@functools.cache
def has_flash_attn() -> str | None:
    """Which flash-attn is importable: ``"fa4"`` (``flash_attn.cute``), ``"fa2"`` or ``None``."""
    try:
        if hasattr(importlib.import_module("flash_attn.cute"), "flash_attn_func"):
            return "fa4"
    except Exception:
        pass
    try:
        if hasattr(importlib.import_module("flash_attn"), "flash_attn_func"):
            return "fa2"
    except Exception:
        pass
    return None


@functools.cache
def has_triton() -> bool:
    """True if triton imports."""
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


def _always(device: torch.device, dtype: torch.dtype) -> bool:
    return True


@dataclass(frozen=True)
class _Backend:
    name: str
    fn: Callable[..., Any]
    available: Callable[[torch.device, torch.dtype], bool]
    priority: int
    requires: str
    supports: Callable[[dict], str | None] | None


_REGISTRY: dict[str, dict[str, _Backend]] = {}
_LOGGED: set[tuple] = set()


def register_backend(
    op: str,
    name: str,
    fn: Callable[..., Any],
    available: Callable[[torch.device, torch.dtype], bool] = _always,
    priority: int = 0,
    *,
    requires: str = "",
    supports: Callable[[dict], str | None] | None = None,
) -> None:
    """Register (or replace) implementation ``name`` of ``op``.

    ``available(device, dtype)`` says whether it can run for inputs on that device/dtype; it is
    only called when the op resolves a backend, so it may import optional packages.
    ``requires`` is a human description used in error messages ("a CUDA device and fla").
    ``supports(features)`` optionally inspects the call features each op passes (a dict with
    e.g. ``device``, ``head_dim``, ``head_dim_v``, ``window``, ``requires_grad``) and returns
    ``None`` if fine or a short reason why this call cannot use the backend.
    Higher ``priority`` wins under ``"auto"``.
    """
    _REGISTRY.setdefault(op, {})[name] = _Backend(name, fn, available, priority, requires, supports)


def list_backends(op: str) -> list[str]:
    """Names registered for ``op``, highest priority first."""
    entries = _entries(op)
    return [b.name for b in sorted(entries.values(), key=lambda b: -b.priority)]


def _entries(op: str) -> dict[str, _Backend]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops with backends: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def _unavailable(b: _Backend, device: torch.device, dtype: torch.dtype) -> str | None:
    if b.available(device, dtype):
        return None
    need = f"; it needs {b.requires}" if b.requires else ""
    return f"it is not available for {device.type} tensors of dtype {dtype}{need}"


def _unsupported(b: _Backend, features: dict | None) -> str | None:
    return b.supports(features or {}) if b.supports is not None else None


def _why_not(b: _Backend, device: torch.device, dtype: torch.dtype, features: dict | None) -> str | None:
    return _unavailable(b, device, dtype) or _unsupported(b, features)


def resolve_backend(
    op: str,
    requested: str,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    features: dict | None = None,
) -> str:
    """Pick the backend name for ``op`` on ``device``/``dtype``.

    ``"auto"`` takes the highest-priority backend that is available and supports ``features``;
    an explicit name that is unknown, not installed or unable to run raises ``ValueError``.
    The choice is logged at INFO once per (op, backend, device type); an installed backend that
    ``"auto"`` passes over because it cannot take the call is logged once at WARNING.
    """
    device = torch.device(device)
    entries = _entries(op)
    if requested == "auto":
        for b in sorted(entries.values(), key=lambda b: -b.priority):
            if _unavailable(b, device, dtype) is not None:
                continue
            reason = _unsupported(b, features)
            if reason is None:
                _log_once(op, b.name, device)
                return b.name
            # An installed fast path that cannot take this call is a performance cliff: say so.
            _log_once(op, b.name, device, skipped_because=reason)
        raise ValueError(f"{op}: no registered backend can run on {device.type} with dtype {dtype}")
    if requested not in entries:
        raise ValueError(
            f"{op}: unknown backend {requested!r}; choose 'auto' or one of {list_backends(op)}"
        )
    reason = _why_not(entries[requested], device, dtype, features)
    if reason is not None:
        valid = [n for n in list_backends(op) if _why_not(entries[n], device, dtype, features) is None]
        raise ValueError(
            f"{op}: backend {requested!r} cannot run here: {reason}. "
            f"Valid choices for this call: {['auto'] + valid}"
        )
    _log_once(op, requested, device)
    return requested


def get_backend(op: str, name: str) -> Callable[..., Any]:
    """The implementation registered as ``name`` for ``op``."""
    entries = _entries(op)
    if name not in entries:
        raise ValueError(f"{op}: unknown backend {name!r}; choose one of {list_backends(op)}")
    return entries[name].fn


def _log_once(op: str, name: str, device: torch.device, skipped_because: str | None = None) -> None:
    key = (op, name, device.type, skipped_because)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    if skipped_because is None:
        logger.info("hybrid_lm.ops: %s on %s uses backend %r", op, device.type, name)
    else:
        logger.warning("hybrid_lm.ops: %s on %s skips installed backend %r: %s", op, device.type, name, skipped_because)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the references compute in: fp32, or fp64 for fp64 inputs (so gradchecks stay exact)."""
    return torch.promote_types(dtype, torch.float32)


def autocast_off(x: torch.Tensor):
    """Autocast off on `x`'s device, for references that cast to `compute_dtype` themselves: a bf16 autocast (a CPU
    bf16 step, or a GPU without the fast backend) would redo their einsums/matmuls in bf16 under them."""
    return torch.autocast(x.device.type, enabled=False)


def without_autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a reference under `autocast_off` of its first argument."""

    @functools.wraps(fn)
    def wrapped(x, *args, **kwargs):
        with autocast_off(x):
            return fn(x, *args, **kwargs)

    return wrapped


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, op: str) -> list[int]:
    """Validate packed-document offsets ``[N+1]`` over ``total`` tokens; return them as a list.

    Costs one host sync; the fast GPU paths that need no list skip it.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(
            f"{op}: cu_seqlens must start at 0 and end at the token count {total}, got {offsets[0]}..{offsets[-1]}"
        )
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {offsets}")
    return offsets
