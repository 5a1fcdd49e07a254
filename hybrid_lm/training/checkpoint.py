"""Atomic, verifiable training checkpoints.

Layout of one checkpoint, `RUN/checkpoints/step_XXXXXXXX/`:
    model.safetensors, config.yaml      the model (`hybrid_lm.save_model`), loadable by `hybrid_lm.load_model`
    optimizer.pt                        AdamW state (full, unsharded, keyed by parameter name)
    trainer_state.pt                    step, tokens seen, scheduler, data position, RNG states of every rank
    train_config.yaml                   the resolved training config
    tokenizer.json, tokenizer_config.json, ...   a copy of the tokenizer
    manifest.json                       size + sha256 of every file above, written last

Everything is written into `checkpoints/.tmp_step_XXXXXXXX/`, fsynced, and renamed into place, so a crash never
leaves a half checkpoint under a valid name; the manifest catches files damaged later.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hybrid_lm.model.io import CHECKPOINTS_SUBDIR, checkpoint_dirs
from hybrid_lm.utils.files import fsync_dir, fsync_tree, verify_manifest, write_manifest

__all__ = ["CHECKPOINTS_SUBDIR", "step_dir_name", "list_checkpoints", "verify", "find_latest_valid",
           "write_checkpoint", "prune_checkpoints", "capture_rng_state", "restore_rng_state",
           "load_trainer_state", "load_optimizer_state"]

def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Completed (renamed) checkpoint folders of a run, oldest first; temp folders are ignored."""
    return checkpoint_dirs(run_dir)


def verify(ckpt_dir: str | os.PathLike) -> None:
    """Raise ValueError naming the missing, truncated or corrupted file of a checkpoint; None when it is intact."""
    verify_manifest(ckpt_dir)


def find_latest_valid(run_dir: str | os.PathLike, *, warn: bool = True) -> Path | None:
    """The newest checkpoint that passes `verify`, warning about each newer broken one; None if there is none."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify(ckpt)
            return ckpt
        except ValueError as e:
            if warn:
                warnings.warn(f"skipping broken checkpoint: {e}", stacklevel=2)
    return None


def write_checkpoint(run_dir: str | os.PathLike, step: int, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Create `RUN/checkpoints/step_XXXXXXXX/` atomically; each writer fills the temp folder it is given."""
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash mid-write
    tmp.mkdir()
    for write in writers.values():
        write(tmp)
    fsync_tree(tmp)
    write_manifest(tmp)
    fsync_dir(tmp)
    if final.exists():
        # rewriting a step (e.g. after resuming from it): move the old one aside first, os.replace needs a free name
        old = root / f".old_{step_dir_name(step)}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never the newest valid one; returns the deleted."""
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep_last] if keep_last > 0 else []
    latest_valid = find_latest_valid(run_dir, warn=False)
    doomed = [p for p in doomed if p != latest_valid]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def capture_rng_state() -> dict:
    """RNG states of python, numpy, torch CPU and CUDA, as plain types that `torch.load(weights_only=True)` reads."""
    import random

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: touching others would open contexts
    return state


def restore_rng_state(state: dict) -> None:
    import random

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_trainer_state(ckpt_dir: str | os.PathLike) -> dict:
    return torch.load(Path(ckpt_dir) / "trainer_state.pt", map_location="cpu", weights_only=True)


def load_optimizer_state(ckpt_dir: str | os.PathLike) -> dict:
    return torch.load(Path(ckpt_dir) / "optimizer.pt", map_location="cpu", weights_only=True)
