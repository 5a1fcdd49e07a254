"""Watching a run: `metrics.jsonl`, optional TensorBoard, a loss-curve PNG and generated samples.

Only rank 0 builds a Monitor. Records are JSON lines; a training line holds step, loss, lm_loss, aux_loss, lr,
tokens, tokens_per_s, grad_norm and `metrics` (per-DSA-layer indexer KL / recall); an eval line holds step, tokens
and eval_loss. `loss.png` plots the losses and, for a run with DSA layers, `dsa.png` the indexer KL and recall.
When a run resumes, lines past the resumed step are dropped so the file tells one consistent story.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

from ..utils.plotting import pyplot, save_figure

__all__ = ["Monitor", "read_metrics", "plot_losses", "plot_dsa", "dsa_series"]


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break  # a line cut by a crash ends the readable history
    return records


def plot_losses(records: list[dict], path: str | Path, reference: float | None = None, title: str = "") -> None:
    """Train LM loss and eval loss against step (PNG); `reference` draws the unigram entropy line."""
    plt = pyplot()
    train = [(r["step"], r["lm_loss"]) for r in records if "lm_loss" in r and _finite(r["lm_loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and _finite(r["eval_loss"])]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=1.0, alpha=0.8, label="train LM loss")
    if evals:
        ax.plot(*zip(*evals), "o-", ms=3, label="eval loss")
    if reference is not None:
        ax.axhline(reference, color="grey", ls="--", lw=1, label=f"unigram entropy ({reference:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def dsa_series(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per-layer DSA series from training records: {"layer<i>": {"kl": [(step, v)], "recall": [(step, v)]}}."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in records:
        for key, value in r.get("metrics", {}).items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "dsa" and parts[2] in ("kl", "recall") and _finite(value):
                series.setdefault(parts[1], {"kl": [], "recall": []})[parts[2]].append((r["step"], value))
    return dict(sorted(series.items(), key=lambda kv: int(kv[0].removeprefix("layer") or 0)))


def plot_dsa(stages: list[tuple[str, list[dict]]], path: str | Path, title: str = "") -> None:
    """Indexer KL (log scale) and attention recall of every DSA layer against step (PNG).

    `stages` are consecutive runs, e.g. [("dense warm-up", records), ("sparse", records)]: each later stage's
    steps continue after the previous one's last step, with a dotted line at each boundary. The warm-up's KL is
    over all keys, the sparse stage's over the selected top-k (DeepSeek-V3.2's two losses); recall is the share
    of the dense attention mass on the selected keys in both.
    """
    plt = pyplot()
    fig, (ax_kl, ax_rec) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    offset, layers_seen = 0, []
    for s, (label, records) in enumerate(stages):
        series = dsa_series(records)
        style = ("-", "--", ":", "-.")[s % 4]
        for layer, data in series.items():
            if layer not in layers_seen:
                layers_seen.append(layer)
            color = colors[layers_seen.index(layer) % len(colors)]
            for ax, metric in ((ax_kl, "kl"), (ax_rec, "recall")):
                if data[metric]:
                    steps, values = zip(*data[metric])
                    ax.plot([offset + x for x in steps], values, style, color=color, lw=1.2,
                            label=f"{layer} ({label})")
        last = max((r["step"] for r in records), default=0)
        if s < len(stages) - 1:
            for ax in (ax_kl, ax_rec):
                ax.axvline(offset + last, color="grey", ls=":", lw=1)
        offset += last
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("indexer KL (nats; warm-up: all keys, sparse: top-k)")
    ax_rec.set_ylabel("attention recall (dense mass on top-k)")
    for ax in (ax_kl, ax_rec):
        ax.set_xlabel("step (stages back to back)")
        ax.grid(alpha=0.3)
    ax_rec.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    save_figure(fig, path)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _samples_up_to(text: str, step: int) -> str:
    """The `=== step N ===` blocks of a samples file with N <= step."""
    blocks = re.split(r"(?m)^(?==== step \d+ ===$)", text)
    return "".join(b for b in blocks if (m := re.match(r"=== step (\d+) ===", b)) and int(m.group(1)) <= step)


class Monitor:
    def __init__(self, run_dir: Path, resume_step: int | None, reference: float | None, title: str,
                 tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.txt"
        self.plot_path = self.run_dir / "loss.png"
        self.reference, self.title = reference, title
        kept = [r for r in read_metrics(self.metrics_path) if resume_step is not None and r["step"] <= resume_step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept
        if resume_step is None:
            self.samples_path.write_text("")
        elif self.samples_path.is_file():  # as the metrics: samples after the resumed step are written again
            self.samples_path.write_text(_samples_up_to(self.samples_path.read_text(), resume_step))
        self._file = open(self.metrics_path, "a")
        self.tb = self._open_tensorboard(resume_step) if tensorboard else None

    def _open_tensorboard(self, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        # as in metrics.jsonl: TensorBoard hides the earlier event files' points past the resumed step (all of them
        # for a fresh run), which the resumed run logs again
        purge_step = 0 if resume_step is None else resume_step + 1
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, record: dict) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and _finite(value):
                    self.tb.add_scalar(key, value, step)
            for key, value in record.get("metrics", {}).items():
                if _finite(value):
                    self.tb.add_scalar(key, value, step)

    def sample(self, step: int, text: str) -> None:
        with open(self.samples_path, "a") as f:
            f.write(f"=== step {step} ===\n{text}\n\n")
        if self.tb is not None:
            self.tb.add_text("sample", text, step)

    def plot(self) -> None:
        try:
            plot_losses(self.records, self.plot_path, self.reference, self.title)
            if dsa_series(self.records):
                plot_dsa([(self.run_dir.name, self.records)], self.run_dir / "dsa.png", self.title)
        except ImportError as e:  # a missing matplotlib costs the picture, not the run
            warnings.warn(f"no loss plot: {e}", stacklevel=2)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()
