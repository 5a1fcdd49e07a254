"""PNG plots of evaluation results, for one model or several side by side.

Every function takes `runs`: model name -> an evaluation summary (`runner.evaluate`'s `results.json`), so the
comparison report draws the same pictures as `hybrid-lm eval` with more lines.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

from ..utils.plotting import pyplot, save_figure
from .tasks import TASKS


def have_matplotlib() -> bool:
    """PNGs need matplotlib; without it the JSON and markdown are still written (with a warning)."""
    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn("matplotlib is not installed: no PNG plots (pip install matplotlib)", stacklevel=2)
        return False
    return True


def plot_tasks(runs: dict, out_dir: Path) -> list[str]:
    """One PNG per evaluated task in `out_dir` (perplexity.png, mqar.png, passkey.png, dsa_topk.png, as far as
    the summaries hold those cells); returns the file names written."""
    cells = [c for summary in runs.values() for c in summary["cells"]]
    names = []
    if not have_matplotlib():
        return names
    if any(c["task"] == "perplexity" for c in cells):
        plot_perplexity(runs, Path(out_dir) / "perplexity.png")
        names.append("perplexity.png")
    for task in TASKS:
        if any(c["task"] == task for c in cells):
            plot_recall(runs, task, Path(out_dir) / f"{task}.png")
            names.append(f"{task}.png")
    if any(c["topk"] is not None for c in cells):
        plot_topk(runs, Path(out_dir) / "dsa_topk.png")
        names.append("dsa_topk.png")
    return names


def _cells(summary: dict, task: str, topk_sweep: bool = False) -> list[dict]:
    return [c for c in summary["cells"] if c["task"] == task and (c["topk"] is not None) == topk_sweep
            and "skipped" not in c]


def _length_axis(ax, lengths) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(lengths)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t) for t in ticks])
    ax.set_xlabel("context length (tokens)")
    ax.grid(alpha=0.3)


def _trained_lines(ax, runs) -> None:
    seen = {s["model"].get("trained_seq_len") for s in runs.values()} - {None}
    for i, T in enumerate(sorted(seen)):
        ax.axvline(T, color="grey", ls=":", lw=1, label="training length" if i == 0 else None)


def plot_perplexity(runs: dict, path: Path) -> None:
    """Held-out loss against window length: all positions (solid) and the second half of each window (dashed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    lengths = set()
    for name, summary in runs.items():
        cells = sorted(_cells(summary, "perplexity"), key=lambda c: c["length"])
        if not cells:
            continue
        xs = [c["length"] for c in cells]
        lengths |= set(xs)
        line, = ax.plot(xs, [c["loss"] for c in cells], "o-", ms=3, label=name)
        ax.plot(xs, [c["tail_loss"] for c in cells], "--", color=line.get_color(), lw=1)
    if lengths:
        _length_axis(ax, lengths)
    _trained_lines(ax, runs)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("perplexity vs context (dashed: second half of each window)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_recall(runs: dict, task: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    lengths = set()
    for name, summary in runs.items():
        cells = sorted(_cells(summary, task), key=lambda c: c["length"])
        if cells:
            lengths |= {c["length"] for c in cells}
            ax.plot([c["length"] for c in cells], [c["accuracy"] for c in cells], "o-", ms=4, label=name)
    if lengths:
        _length_axis(ax, lengths)
    _trained_lines(ax, runs)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{task}: recall vs context length")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_topk(runs: dict, path: Path) -> None:
    """DSA top-k sweep: accuracy against keys kept per query, one line per (model, task, length)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    topks = set()
    for name, summary in runs.items():
        for task in TASKS:
            cells = _cells(summary, task, topk_sweep=True)
            for L in sorted({c["length"] for c in cells}):
                row = sorted((c for c in cells if c["length"] == L), key=lambda c: c["topk"])
                topks |= {c["topk"] for c in row}
                ax.plot([c["topk"] for c in row], [c["accuracy"] for c in row], "o-", ms=4,
                        label=f"{name} {task} T={L}")
        for k in summary["model"].get("dsa_topk") or []:
            ax.axvline(k, color="grey", ls=":", lw=1)
    if topks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(topks))
        ax.set_xticklabels([str(k) for k in sorted(topks)])
    ax.set_xlabel("keys kept per query (topk; dotted: trained value)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.set_title("DSA: recall vs selected keys")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_training(curves: dict, path: Path) -> None:
    """`curves`: name -> (tokens, train loss, eval tokens, eval loss) lists; loss against tokens seen."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, (tokens, loss, eval_tokens, eval_loss) in curves.items():
        line, = ax.plot(tokens, loss, lw=1, alpha=0.8, label=f"{name} (train)")
        if eval_tokens:
            ax.plot(eval_tokens, eval_loss, "o--", ms=3, color=line.get_color(), label=f"{name} (held-out)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training loss vs tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_throughput(rates: dict, path: Path) -> None:
    """`rates`: name -> training tokens per second."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    names = list(rates)
    values = [rates[n] if rates[n] is not None and math.isfinite(rates[n]) else 0.0 for n in names]
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_ylabel("training tokens / s")
    ax.set_title("training throughput")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
