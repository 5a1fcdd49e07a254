"""Training configuration: a typed dataclass loaded strictly from a training YAML.

A training YAML names the model (`model:` a model YAML, or `init_from:` a saved model/run to continue from), the
data, the optimiser and schedule, the DSA stage and the logging cadence. Relative paths written in a YAML
(`model`, `init_from`, `out_dir`, `data.source`, `data.tokenizer`, `data.cache_dir`) are relative to that YAML;
paths given on the command line (`--set`, `--out`) are relative to the working directory.
"""

from __future__ import annotations

import copy
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

import hybrid_lm
from hybrid_lm.data import DataConfig
from hybrid_lm.utils.typed import from_dict, to_dict

__all__ = ["OptimConfig", "TrainConfig", "load_train_config", "apply_overrides", "dump_train_config",
           "default_config_path", "validate"]

_DATA_NAMES = ("shakespeare",)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0                 # max global grad norm; 0 disables clipping
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2            # wsd: share of the steps spent decaying
    total_steps: int | None = None         # length of the schedule; None -> max_steps


@dataclass
class TrainConfig:
    model: str | None = None               # model YAML, or a zoo name (model_configs/<name>.yaml)
    init_from: str | None = None           # or: a saved model / checkpoint / run folder to continue training
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 16                   # rows per micro-step, summed over all ranks
    seq_len: int = 256
    grad_accum: int = 1
    max_steps: int = 1000                  # steps of the run and length of the LR schedule
    dsa_stage: Literal["none", "dense_warmup", "sparse"] = "none"
    indexer_loss_weight: float = 0.01      # sparse stage only; dense_warmup optimises the KL alone
    eval_every: int = 250
    eval_at_start: bool = False            # also evaluate (and sample) before the first step
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 128
    sample_temperature: float = 0.8
    sample_top_k: int | None = 40
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool | int = False  # recompute blocks' activations in the backward (less memory):
                                                  # true every block, an integer n the first n blocks
    residual_dtype: Literal["fp32", "bf16"] = "fp32"  # the residual stream under bf16 autocast (bf16: fewer bytes)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    out_dir: str | None = None             # default: runs/<training YAML name>
    max_nonfinite: int = 3                 # stop after this many non-finite losses in a row


_SECTIONS = {"data": DataConfig, "optim": OptimConfig}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`, users type `1e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def validate(cfg: TrainConfig, where: str = "training config") -> None:
    if (cfg.model is None) == (cfg.init_from is None):
        raise ValueError(f"{where}: set exactly one of 'model' (a model YAML) or 'init_from' (a saved model or run)")
    positive = ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_every", "log_every", "save_every",
                "keep_last", "max_nonfinite")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{where}: '{name}' = {getattr(cfg, name)} must be >= 1")
    o = cfg.optim
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ValueError(f"{where}: need 0 <= optim.min_lr <= optim.lr and lr > 0 (got lr={o.lr}, min_lr={o.min_lr})")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"{where}: optim.betas = {o.betas} must be two numbers in [0, 1)")
    if o.warmup_steps < 0 or not 0 < o.decay_fraction <= 1 or o.grad_clip < 0:
        raise ValueError(f"{where}: need optim.warmup_steps >= 0, 0 < optim.decay_fraction <= 1, optim.grad_clip >= 0")
    if o.total_steps is not None and o.total_steps < 1:
        raise ValueError(f"{where}: optim.total_steps = {o.total_steps} must be >= 1 (or null for max_steps)")
    if cfg.residual_dtype == "bf16" and cfg.dtype == "fp32":
        raise ValueError(f"{where}: residual_dtype: bf16 keeps the residual stream in bf16 under bf16 autocast, but "
                         "dtype: fp32 turns autocast off; set dtype: bf16 (or auto on a GPU) or residual_dtype: fp32")
    if not isinstance(cfg.activation_checkpointing, bool) and cfg.activation_checkpointing < 0:
        raise ValueError(f"{where}: activation_checkpointing = {cfg.activation_checkpointing} must be true, false "
                         "or a number of blocks >= 0")
    if cfg.indexer_loss_weight < 0 or cfg.sample_tokens < 0 or cfg.eval_batches < 0:
        raise ValueError(f"{where}: indexer_loss_weight, sample_tokens and eval_batches must be >= 0")


def default_config_path() -> Path:
    """`train/configs/default.yaml` of the checkout this package runs from (editable install)."""
    path = Path(hybrid_lm.__file__).resolve().parents[1] / "train" / "configs" / "default.yaml"
    if not path.is_file():
        raise ValueError(f"default training config not found at {path}: `hybrid-lm train` without a CONFIG needs "
                         "the repository checkout (pip install -e .); pass a training YAML explicitly instead")
    return path


def _resolve(value: str | None, base: Path) -> str | None:
    if value is None or Path(value).expanduser().is_absolute():
        return None if value is None else str(Path(value).expanduser())
    return str((base / value).resolve())


def _is_zoo_name(value) -> bool:
    """`model: deepseek-v32-tiny` names model_configs/deepseek-v32-tiny.yaml (see `hybrid-lm zoo`)."""
    return isinstance(value, str) and bool(value) and not re.search(r"[/\\]|\.ya?ml$", value)


def _resolve_paths(raw: dict, base: Path) -> dict:
    raw = copy.deepcopy(raw)
    for key in ("model", "init_from", "out_dir"):
        if key == "model" and _is_zoo_name(raw.get(key)):
            continue
        if isinstance(raw.get(key), str):
            raw[key] = _resolve(raw[key], base)
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("tokenizer", "cache_dir"):
            if isinstance(data.get(key), str):
                data[key] = _resolve(data[key], base)
        src = data.get("source")
        if isinstance(src, str) and src not in _DATA_NAMES and not src.startswith("hf:"):
            data["source"] = _resolve(src, base)
    return raw


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training YAML (default: `default_config_path()`), resolve its paths, apply `--set` overrides."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise ValueError(f"training config {path} does not exist")
    raw = _yaml_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a training config must be a mapping of keys to values")
    raw = _resolve_paths(raw, path.resolve().parent)
    if raw.get("out_dir") is None:
        raw["out_dir"] = str(Path("runs") / path.stem)
    cfg = from_dict(TrainConfig, raw, str(path))
    validate(cfg, str(path))
    return apply_overrides(cfg, overrides or [], where=str(path))


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-3")
    return key.strip().split("."), _yaml_load(text)


def _check_key(item: str, keys: list[str], depth: int, schema: type) -> None:
    valid = sorted(f.name for f in fields(schema))
    if keys[depth] not in valid:
        where = ".".join(keys[:depth]) or "the top level"
        raise ValueError(f"--set {item!r}: unknown key '{'.'.join(keys[:depth + 1])}'; valid keys at {where}: "
                         f"{', '.join(valid)}")


def _is_text_field(keys: list[str]) -> bool:
    """Whether `keys` names a string setting (`str` or `str | None`) of the training config or a section."""
    if len(keys) == 1:
        tp = typing.get_type_hints(TrainConfig).get(keys[0])
    elif len(keys) == 2 and keys[0] in _SECTIONS:
        tp = typing.get_type_hints(_SECTIONS[keys[0]]).get(keys[1])
    else:
        return False
    return tp is str or set(typing.get_args(tp)) == {str, type(None)}


def apply_overrides(cfg: TrainConfig, overrides: list[str], where: str = "training config") -> TrainConfig:
    """Apply `a.b=value` strings (value parsed as YAML) with strict key checking; returns a new config.

    Keys below `model_overrides` are free-form here: the model config checks them when the model is built.
    """
    raw = to_dict(cfg)
    for item in overrides:
        keys, value = _parse_override(item)
        _check_key(item, keys, 0, TrainConfig)
        head, rest = keys[0], keys[1:]
        if rest and head in _SECTIONS:
            if len(rest) > 1:
                raise ValueError(f"--set {item!r}: '{head}.{rest[0]}' is not a section")
            _check_key(item, keys, 1, _SECTIONS[head])
        elif rest and head != "model_overrides":
            raise ValueError(f"--set {item!r}: '{head}' is not a section")
        if value is not None and not isinstance(value, str) and _is_text_field(keys):
            value = item.partition("=")[2]  # `sample_prompt=ROMEO:` is text, not the YAML mapping {ROMEO: null}
        # a path on the command line is relative to the working directory: made absolute here, so the config a
        # checkpoint saves (and `--resume` without CONFIG reads back from the checkpoint folder) still names it
        nested = value
        for key in reversed(keys):
            nested = {key: nested}
        nested = _resolve_paths(nested, Path.cwd())
        for key in keys:
            nested = nested[key]
        value = nested
        node = raw
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    cfg = from_dict(TrainConfig, raw, f"{where} (with --set)")
    validate(cfg, where)
    return cfg


def dump_train_config(cfg: TrainConfig) -> str:
    """YAML text of `cfg`; `load_train_config` of it gives `cfg` back (its paths are already absolute)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
