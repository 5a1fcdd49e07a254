"""The comparison report: `report.md` (tables) with PNGs beside it (loss vs tokens, recall vs length, perplexity
vs length, DSA top-k, training throughput) and `summary.json` holding every number the tables show.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from pathlib import Path

from ..training.monitor import read_metrics
from .plots import have_matplotlib, plot_tasks, plot_throughput, plot_training
from .runner import RECALL_TASKS


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _cell(summary: dict, task: str, length: int, topk=None) -> dict | None:
    for c in summary["cells"]:
        if c["task"] == task and c["length"] == length and c["topk"] == topk:
            return c
    return None


def _value(cell: dict | None, key: str, digits: int = 2) -> str:
    if cell is None:
        return ""
    if "skipped" in cell:
        return "n/a"
    return f"{cell[key]:.{digits}f}"


def training_stats(run_dir: Path) -> dict:
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [r for r in records if "lm_loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    rates = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    return {
        "tokens": train[-1]["tokens"] if train else None,
        "final_train_loss": train[-1]["lm_loss"] if train else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "curve": ([r["tokens"] for r in train], [r["lm_loss"] for r in train],
                  [r["tokens"] for r in evals], [r["eval_loss"] for r in evals]),
    }


def _kind(model: dict) -> str:
    """gdn-only / hybrid / other, from the registered mixers behind the layers (an alias such as a sliding-window
    `local: {type: attention}` counts as its type; summaries written before `mixer_types` give the names)."""
    kinds = set(model.get("mixer_types") or model["layer_types"])
    if kinds == {"gated_deltanet"}:
        return "gdn-only"
    if "gated_deltanet" in kinds and kinds & {"attention", "dsa"}:
        return "hybrid"
    return "other"


MARGIN = 0.2  # "well above": every hybrid's accuracy at least this much over the best GDN-only model's


def ordering_check(summaries: dict) -> list[str]:
    """At the longest evaluated length: are the attention / DSA hybrids well above the GDN-only models on recall?"""
    lines = []
    kinds = {n: _kind(s["model"]) for n, s in summaries.items()}
    gdn = [n for n, k in kinds.items() if k == "gdn-only"]
    hybrids = [n for n, k in kinds.items() if k == "hybrid"]
    if not gdn or not hybrids:
        return ["(needs at least one GDN-only model and one GDN hybrid with attention or DSA)"]
    for task in RECALL_TASKS:
        lengths = [c["length"] for s in summaries.values() for c in s["cells"]
                   if c["task"] == task and c["topk"] is None and "skipped" not in c]
        if not lengths:
            continue
        L = max(lengths)
        acc = {n: (_cell(summaries[n], task, L) or {}).get("accuracy") for n in summaries}
        best_gdn = max((acc[n] for n in gdn if acc[n] is not None), default=None)
        parts = ", ".join(f"{n} {acc[n]:.2f}" for n in hybrids + gdn if acc[n] is not None)
        holds = best_gdn is not None and all(acc[n] is not None and acc[n] >= best_gdn + MARGIN for n in hybrids)
        lines.append(f"- {task} at {_fmt_len(L)} tokens: {parts} -> hybrids above GDN-only by >= {MARGIN:g}: "
                     f"**{'yes' if holds else 'no'}**")
    return lines


def _recall_table(summaries: dict, task: str) -> list[str]:
    lengths = sorted({c["length"] for s in summaries.values() for c in s["cells"]
                      if c["task"] == task and c["topk"] is None})
    if not lengths:
        return []
    rows = [f"| model | {' | '.join(_fmt_len(L) for L in lengths)} |", "|---|" + "---:|" * len(lengths)]
    for name, s in summaries.items():
        rows.append(f"| {name} | " + " | ".join(_value(_cell(s, task, L), "accuracy") for L in lengths) + " |")
    return rows


def _ppl_table(summaries: dict) -> list[str]:
    lengths = sorted({c["length"] for s in summaries.values() for c in s["cells"] if c["task"] == "perplexity"})
    if not lengths:
        return []
    rows = [f"| model | {' | '.join(_fmt_len(L) for L in lengths)} |", "|---|" + "---:|" * len(lengths)]
    for name, s in summaries.items():
        cells = [_cell(s, "perplexity", L) for L in lengths]
        rows.append(f"| {name} | " + " | ".join(
            "" if c is None else "n/a" if "skipped" in c else f"{c['loss']:.2f} ({c['tail_loss']:.2f})"
            for c in cells) + " |")
    return rows


def _topk_table(summaries: dict) -> list[str]:
    rows = []
    for name, s in summaries.items():
        cells = [c for c in s["cells"] if c["topk"] is not None]
        if not cells:
            continue
        topks = sorted({c["topk"] for c in cells})
        if not rows:
            rows = [f"| model | task | length | {' | '.join(f'k={k}' for k in topks)} |",
                    "|---|---|---:|" + "---:|" * len(topks)]
        for task in RECALL_TASKS:
            for L in sorted({c["length"] for c in cells if c["task"] == task}):
                rows.append(f"| {name} | {task} | {_fmt_len(L)} | " + " | ".join(
                    _value(_cell(s, task, L, k), "accuracy") for k in topks) + " |")
    return rows


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()})"


def write_report(cfg, train_cfgs: dict, summaries: dict, mix, report_dir: Path, command: str = "") -> Path:
    """Write report.md, summary.json and the PNGs into `report_dir`; returns report.md's path."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    stats = {name: training_stats(c.out_dir) for name, c in train_cfgs.items()}
    pictures = plot_tasks(summaries, report_dir)
    if have_matplotlib():
        plot_training({n: s["curve"] for n, s in stats.items()}, report_dir / "loss_vs_tokens.png")
        plot_throughput({n: s["tokens_per_s"] for n, s in stats.items()}, report_dir / "tokens_per_s.png")
        pictures += ["loss_vs_tokens.png", "tokens_per_s.png"]

    def img(name: str) -> list[str]:
        return [f"![{name.removesuffix('.png')}]({name})"] if name in pictures else []

    first = next(iter(train_cfgs.values()))
    device = summaries[next(iter(summaries))]["settings"]["device"]
    lines = _header(cfg, first, mix, device, command)
    lines += ["## Models and training", "",
              "| model | layers | params | tokens | train tokens/s | final train loss | held-out loss |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        st, m = stats[name], s["model"]
        layers = ", ".join(f"{t} x{m['layer_types'].count(t)}" for t in dict.fromkeys(m["layer_types"]))
        lines.append(f"| {name} | {layers} | {m['parameters'] / 1e6:.2f}M | {st['tokens'] or 0:,} | "
                     f"{st['tokens_per_s'] or 0:,.0f} | {_num(st['final_train_loss'])} | "
                     f"{_num(st['final_eval_loss'])} |")
    lines += ["", "The train loss of a recall document counts its answers only (see `hybrid_lm/eval/masked.py`); the "
              "held-out loss is on the text corpus alone.", "", *img("loss_vs_tokens.png"),
              *img("tokens_per_s.png"), ""]
    settings = summaries[next(iter(summaries))]["settings"]
    pool = f", {settings['pool_size']} key and {settings['pool_size']} value ids" if settings.get("pool_size") else ""
    for task, title in (("mqar", f"MQAR accuracy ({settings['mqar_pairs']} pairs{pool}, every key asked)"),
                        ("passkey", "Passkey retrieval accuracy (5 digits, exact match)")):
        table = _recall_table(summaries, task)
        if table:
            lines += [f"## {title}", "", *table, "", *img(f"{task}.png"), ""]
    lines += ["## Expected ordering (recall at the longest length)", "", *ordering_check(summaries), ""]
    table = _ppl_table(summaries)
    if table:
        lines += ["## Held-out loss vs context length", "",
                  "Mean loss per token over windows of each length (in brackets: the second half of each window, "
                  "where a model that does not extrapolate breaks down first). n/a: beyond "
                  "max_position_embeddings or the held-out split.", "", *table, "", *img("perplexity.png"), ""]
    table = _topk_table(summaries)
    if table:
        lines += ["## DSA: recall vs keys kept per query", "", *table, "", *img("dsa_topk.png"), ""]
    notes = sorted({f"{n}: {note}" for n, s in summaries.items() for note in s["notes"]})
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    (report_dir / "report.md").write_text("\n".join(lines))
    dump = {name: {"model": s["model"], "settings": s["settings"], "cells": s["cells"],
                   "training": {k: v for k, v in stats[name].items() if k != "curve"}}
            for name, s in summaries.items()}
    (report_dir / "summary.json").write_text(json.dumps(dump, indent=2) + "\n")
    return report_dir / "report.md"


def _num(x) -> str:
    return "" if x is None else f"{x:.3f}"


def _header(cfg, train_cfg, mix, device: str, command: str) -> list[str]:
    tokens = train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum * train_cfg.max_steps
    mixed = mix.info["tokens"]
    lines = [f"# {cfg.title or 'Hybrid comparison'}", "",
             f"Generated {datetime.date.today().isoformat()} on {_device_name(device)}"
             + (f" by `{command}`" if command else "") + ".", "",
             *([cfg.note, ""] if cfg.note else []),
             f"- Every model trains on {tokens:,} tokens ({train_cfg.max_steps} steps x {train_cfg.batch_size} rows x "
             f"{train_cfg.seq_len} tokens x {train_cfg.grad_accum} accumulation).",
             f"- Data: `{cfg.data.source}` ({mixed['text']:,} train tokens) mixed with {mixed['recall']:,} tokens of "
             f"generated recall documents ({', '.join(f'{k} {v:g}' for k, v in cfg.mix.tasks.items())}; "
             f"{cfg.mix.min_length}-{cfg.mix.max_length} tokens each); the held-out split "
             f"({mixed['held_out']:,} tokens) is text only.",
             "- Recall is evaluated on fresh samples whose filler comes from the held-out text; the same samples for "
             "every model. Scored teacher-forced: an answer counts when the argmax at each of its tokens is right "
             "(the same test as an exact match of the greedy continuation).", ""]
    return lines
