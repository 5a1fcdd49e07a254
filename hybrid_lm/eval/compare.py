"""The hybrid comparison recipe: train several models for the same tokens on a text corpus mixed with recall data,
evaluate each (`runner.evaluate`), and write a report (`report.py`). One YAML names everything:

    runs: {dense: cpu/dense.yaml, gdn: cpu/gdn.yaml, ...}   # training YAMLs, relative to this file
    data: {source: shakespeare, vocab_size: 4096}          # the text corpus
    mix: {recall_fraction: 0.5, max_length: 512}           # `mix.MixConfig`
    train_overrides: [max_steps=300]                       # `--set` items applied to every run
    eval: {lengths: [512, 1024, 16384], samples: 16}       # `runner.EvalConfig`

Layout of `out_dir`: `data/` (the mixed corpus), `runs/<name>/` (a training run each, its evaluation under
`eval/`), and the report in `report_dir` (default `out_dir/report`). Every stage resumes: a finished run is not
retrained, an interrupted one continues from its last checkpoint, and evaluation cells are cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..data import DataConfig
from ..utils.typed import from_dict
from .mix import MixConfig, RecallMix, write_recall_mix
from .runner import EvalConfig, evaluate


@dataclass
class CompareConfig:
    runs: dict[str, str]
    data: DataConfig = field(default_factory=DataConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    train_overrides: list[str] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str | None = None             # default: runs/compare-<YAML name>
    report_dir: str | None = None          # default: <out_dir>/report
    title: str = ""
    note: str = ""                         # printed under the title, e.g. the conditions of a recorded run


def load_compare_config(path: str | Path) -> CompareConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"comparison config {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a comparison config must be a mapping")
    if isinstance(raw.get("data"), dict):
        raw["data"] = DataConfig.from_dict(raw["data"], f"{path}: data")
    cfg = from_dict(CompareConfig, raw, str(path))
    if not cfg.runs:
        raise ValueError(f"{path}: 'runs' names no training YAML")
    base = path.resolve().parent
    cfg.runs = {name: str((base / p).resolve()) for name, p in cfg.runs.items()}
    for name, p in cfg.runs.items():
        if not Path(p).is_file():
            raise ValueError(f"{path}: runs.{name} = {p} does not exist")
    for key in ("out_dir", "report_dir"):
        if getattr(cfg, key) is not None:
            setattr(cfg, key, str((base / getattr(cfg, key)).resolve()))
    for key in ("source", "tokenizer", "cache_dir"):
        value = getattr(cfg.data, key)
        if key == "source" and (value == "shakespeare" or value.startswith("hf:")):
            continue
        if value is not None:
            setattr(cfg.data, key, str((base / value).resolve()))
    if cfg.out_dir is None:
        cfg.out_dir = str(Path("runs") / f"compare-{path.stem}")
    cfg.mix.validate(f"{path}: mix")
    cfg.eval.validate(f"{path}: eval")
    if cfg.eval.pool_size is not None and cfg.eval.pool_size != cfg.mix.pool_size:
        raise ValueError(f"{path}: eval.pool_size = {cfg.eval.pool_size} differs from mix.pool_size = "
                         f"{cfg.mix.pool_size}: the models would be asked about key/value ids they never trained on; "
                         "drop eval.pool_size (it follows the mix)")
    if "mqar" in cfg.eval.tasks and cfg.eval.mqar_pairs > cfg.mix.pool_size:
        raise ValueError(f"{path}: eval.mqar_pairs = {cfg.eval.mqar_pairs} exceeds mix.pool_size = "
                         f"{cfg.mix.pool_size}: MQAR needs a distinct key id for every pair")
    return cfg


def run_configs(cfg: CompareConfig, mix: RecallMix) -> dict:
    """name -> TrainConfig, each trained on the mix into out_dir/runs/<name>; all must see the same tokens."""
    from ..training import load_train_config

    data = [f"data.source={mix.source}", f"data.val_fraction={mix.val_fraction!r}"]
    if cfg.data.cache_dir is not None:
        data.append(f"data.cache_dir={cfg.data.cache_dir}")
    runs = {}
    for name, path in cfg.runs.items():
        train_cfg = load_train_config(path, data + list(cfg.train_overrides))
        train_cfg.out_dir = str(Path(cfg.out_dir).resolve() / "runs" / name)
        runs[name] = train_cfg
    tokens = {name: c.batch_size * c.seq_len * c.grad_accum * c.max_steps for name, c in runs.items()}
    if len(set(tokens.values())) > 1:
        raise ValueError(f"the runs would train on different numbers of tokens ({tokens}); a fair comparison needs "
                         "equal batch_size * seq_len * grad_accum * max_steps (set them in train_overrides)")
    return runs


def train_run(train_cfg, mask: np.ndarray | None, progress: bool = True):
    """Train (or finish) one run; with `mask`, recall documents train only on their answers (`masked.py`)."""
    from ..training import Trainer
    from ..training import checkpoint as ckpt_io
    from ..training.build import deterministic_algorithms
    from ..training.distributed import setup_distributed, teardown_distributed

    latest = ckpt_io.find_latest_valid(train_cfg.out_dir, warn=False)
    if latest is not None and int(latest.name.split("_")[1]) >= train_cfg.max_steps:
        if progress:
            print(f"{train_cfg.out_dir}: already trained ({latest.name})")
        return None
    info = setup_distributed(train_cfg.device)
    try:
        with deterministic_algorithms(info.device):
            trainer = Trainer(train_cfg, info, resume=True)
            if mask is not None:
                from .masked import MaskedBatches

                trainer.batches = MaskedBatches(trainer.batches, mask[:len(trainer.prepared.train)])
            result = trainer.fit()
    finally:
        teardown_distributed()
    if result.status == "stopped":  # Ctrl-C: the trainer saved a checkpoint after the current step
        raise KeyboardInterrupt(f"training {train_cfg.out_dir} stopped at step {result.step}; rerun the same command "
                                "to resume it")
    if result.status != "done":
        raise RuntimeError(f"training {train_cfg.out_dir} ended with status {result.status!r}: {result.message}")
    return result


def prepare_mix(cfg: CompareConfig) -> RecallMix:
    """Build (or reuse) the mixed corpus in out_dir/data. The folder is self-contained (tokens, loss mask,
    tokenizer), so it can be built where the text corpus is and copied to a machine that lacks it."""
    return write_recall_mix(cfg.data, Path(cfg.out_dir).resolve() / "data", cfg.mix)


def _warn_slow_kernels(runs: dict) -> None:
    import importlib.util

    if any(str(c.device).startswith("cuda") for c in runs.values()) and importlib.util.find_spec("fla") is None:
        print("warning: fla (flash-linear-attention) is not installed: Gated DeltaNet layers fall back to the "
              "PyTorch reference, many times slower on a GPU (pip install -e '.[gpu]')", flush=True)


def run_comparison(cfg: CompareConfig, *, only: list[str] | None = None, train: bool = True,
                   progress: bool = True, command: str = "") -> Path:
    """Mix the data, train and evaluate every run, write the report; returns the report's path."""
    from .report import write_report

    names = list(cfg.runs) if only is None else only
    unknown = sorted(set(names) - set(cfg.runs))
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; the config has {list(cfg.runs)}")
    out = Path(cfg.out_dir).resolve()
    mix = prepare_mix(cfg)
    runs = run_configs(cfg, mix)
    if train:
        _warn_slow_kernels({n: runs[n] for n in names})
    mask = np.load(mix.mask, mmap_mode="r") if mix.mask is not None else None
    summaries = {}
    for name in names:
        if train:
            train_run(runs[name], mask, progress)
        summaries[name] = evaluate(runs[name].out_dir, cfg.eval, progress=progress)
    report_dir = Path(cfg.report_dir) if cfg.report_dir else out / "report"
    return write_report(cfg, {n: runs[n] for n in names}, summaries, mix, report_dir, command=command)

