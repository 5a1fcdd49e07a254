"""Watching a run: `metrics.jsonl`, optional TensorBoard, a loss-curve PNG and generated samples.

Only rank 0 builds a Monitor. Records are JSON lines; a training line holds step, loss, lm_loss, aux_loss, lr,
tokens, tokens_per_s, grad_norm and `metrics` (per-DSA-layer indexer KL / recall); an eval line holds step, tokens
and eval_loss. When a run resumes, lines past the resumed step are dropped so the file tells one consistent story.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

__all__ = ["Monitor", "read_metrics", "plot_losses"]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


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
        self._file = open(self.metrics_path, "a")
        self.tb = self._open_tensorboard() if tensorboard else None

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

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
        except ImportError as e:  # a missing matplotlib costs the picture, not the run
            warnings.warn(f"no loss plot: {e}", stacklevel=2)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()
