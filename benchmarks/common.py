"""Shared helpers for the GPU benchmarks: timing (median of triton's do_bench), peak memory, result rows.

A result row is a dict with ``op``, ``impl``, ``T``, ``fwd_ms``, ``fwdbwd_ms``, ``tflops``, ``peak_mem_gb`` (None
where not measured) plus free-form extras (``hkv``, ``note``). Shapes follow the ops: [B, T, H, D].
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import torch


def bench_ms(fn, warmup=25, rep=100) -> float:
    """Median milliseconds of fn() over ~rep ms of repeats, after ~warmup ms of warm-up."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def peak_mem_gb(fn) -> float:
    """Peak allocated GiB while fn() runs, inputs already on the device included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def card() -> str:
    return torch.cuda.get_device_name().replace(" ", "-")


def today() -> str:
    return datetime.date.today().isoformat()


def row(op, impl, T, fwd_ms=None, fwdbwd_ms=None, tflops=None, peak_mem_gb=None, **extra) -> dict:
    r = dict(op=op, impl=impl, T=T, fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms, tflops=tflops, peak_mem_gb=peak_mem_gb)
    r.update(extra)
    return r


def guarded(rows: list, what: str, fn):
    """Run one measurement; an error (OOM, missing package) becomes a row with a note instead of a crash."""
    try:
        return fn()
    except Exception as e:  # keep the other measurements of the run
        traceback.print_exc()
        rows.append(row(what, "error", None, note=f"{type(e).__name__}: {str(e)[:200]}"))
        torch.cuda.empty_cache()
        return None


def save(rows: list, name: str) -> str:
    """Write rows to $OUT/<name>.json (the device run's output folder) or benchmarks/results/."""
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    path = os.path.join(folder, f"{name}.json")
    meta = dict(card=torch.cuda.get_device_name(), date=today(), torch=torch.__version__)
    with open(path, "w") as f:
        json.dump([dict(r, **meta) for r in rows], f, indent=1)
    return path


def fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def print_table(rows: list, cols=("op", "impl", "T", "fwd_ms", "fwdbwd_ms", "tflops", "peak_mem_gb")):
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c)) for c in cols))


def random_causal_indices(T: int, K: int, device="cuda", seed=0, local: float = 0.0) -> torch.Tensor:
    """[1, T, K] distinct causal key indices per query in position order, -1 padded for short rows. Each row that
    sees more than K keys takes its `local` * K most recent keys (neighbouring queries then share them, as trained
    indexers' picks overlap) and samples the rest from the keys before them, one key from each of K - L equal
    strata (so they are distinct and ascending); local = 0: all sampled."""
    if not 0.0 <= local <= 1.0:
        raise ValueError(f"local = {local} must be a fraction of topk in [0, 1]")
    g = torch.Generator(device=device).manual_seed(seed)
    n = torch.arange(1, T + 1, device=device)[:, None]  # visible keys per row
    j = torch.arange(K, device=device)[None, :]
    L = round(local * K)  # the window: slots K - L .. K - 1 hold keys n - L .. n - 1
    R = K - L  # sampled slots 0 .. R - 1, stratified over the n - L keys before the window
    u = torch.rand(T, K, device=device, generator=g)
    m = (n - L).clamp(min=R)  # >= one key per stratum in the rows used (n > K)
    lo, hi = (j * m) // max(R, 1), ((j + 1) * m) // max(R, 1)  # stratum j: keys lo .. hi - 1, hi > lo
    sampled = lo + (u * (hi - lo)).floor().long().clamp(max=hi - lo - 1)
    full = torch.where(j < R, sampled, n - K + j)
    return torch.where(n > K, full, torch.where(j < n, j, -1))[None]
