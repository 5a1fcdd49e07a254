"""Building, saving and loading models.

A saved model is a folder with `model.safetensors` and `config.yaml`. A training run folder keeps checkpoints under
`RUN/checkpoints/step_XXXXXXXX/` (each such a folder plus optimiser state); `load_model(RUN)` takes the newest one
whose files verify, and says which it skipped.
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model as _save_safetensors

from ..config import ModelConfig, load_config, save_config
from ..utils.files import MANIFEST_NAME, verify_manifest, write_manifest
from .model import HybridLM

log = logging.getLogger("hybrid_lm")

CHECKPOINTS_SUBDIR = "checkpoints"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def build_model(config: ModelConfig, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> HybridLM:
    """A freshly initialised model; `device="meta"` builds it without allocating memory."""
    with torch.device(device) if device is not None else nullcontext():
        model = HybridLM(config)
    return model.to(dtype=dtype) if dtype is not None else model


def save_model(model: HybridLM, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_safetensors(model, str(directory / WEIGHTS_NAME))  # handles tied embeddings
    save_config(model.config, directory / CONFIG_NAME)
    write_manifest(directory)
    return directory


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """A run's checkpoint folders, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder, a checkpoint folder, or a run folder (-> its newest checkpoint that verifies)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist: pass a run folder, a checkpoint folder or a saved model")
    if (path / WEIGHTS_NAME).is_file():
        return path
    candidates = checkpoint_dirs(path)
    if not candidates:
        raise ValueError(f"{str(path)!r} holds neither {WEIGHTS_NAME} nor {CHECKPOINTS_SUBDIR}/step_*/: "
                         f"is it the output folder of `hybrid-lm train`?")
    for ckpt in reversed(candidates):
        try:
            verify_manifest(ckpt)
            return ckpt
        except ValueError as e:
            log.warning("skipping checkpoint %s: %s", ckpt, e)
    raise ValueError(f"no checkpoint under {path / CHECKPOINTS_SUBDIR} verifies; see the warnings above")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> HybridLM:
    directory = resolve_model_dir(path)
    if (directory / MANIFEST_NAME).is_file():  # a hand-made folder may lack one; checkpoints always have it
        verify_manifest(directory)
    config = load_config(directory / CONFIG_NAME)
    try:
        state = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{directory / WEIGHTS_NAME} is truncated or corrupted ({e}); "
                         f"use an earlier checkpoint of the run") from None
    model = build_model(config, device="meta")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype=dtype) if dtype is not None else model
