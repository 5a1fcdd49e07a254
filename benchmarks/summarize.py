"""Print a results file (benchmarks/results/<date>-<card>.json) as Markdown tables, for BENCHMARKS.md.

    python benchmarks/summarize.py benchmarks/results/2026-11-28-NVIDIA-H100-80GB-HBM3.json
"""

from __future__ import annotations

import json
import sys

COLS = ("run", "impl", "T", "hkv", "rows", "B", "fwd_ms", "bwd_ms", "fwdbwd_ms", "tokens_per_s", "tflops", "mfu",
        "fwd_tflops", "peak_mem_gb", "rel_err_o", "rel_err_dq", "rel_err_dk", "rel_err_dv", "max_abs_diff", "note")


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def main(path: str) -> None:
    with open(path) as f:
        rows = json.load(f)
    print(f"card: {rows[0].get('card')}, date: {rows[0].get('date')}, torch {rows[0].get('torch')}\n")
    for op in dict.fromkeys(r["op"] for r in rows):
        group = [r for r in rows if r["op"] == op]
        cols = [c for c in COLS if any(r.get(c) is not None for r in group)]
        print(f"### {op}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in group:
            print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
