"""What a trainer saves and restores so a resumed run continues exactly where the checkpoint was taken.

Collectives run on every rank (FSDP2 gathers full tensors, RNG states of all ranks are gathered); rank 0 writes.
The schedule itself is not restored from the checkpoint: the resumed config's schedule applies at the saved step,
so a run can be extended (raise `max_steps`) and still match an uninterrupted run with the same config.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

import hybrid_lm
from hybrid_lm.convert import TOKENIZER_FILES
from hybrid_lm.training import checkpoint as ckpt_io
from hybrid_lm.training.config import dump_train_config
from hybrid_lm.training.distributed import gather_objects

__all__ = ["save_training_state", "load_training_state"]


def _sharded(trainer) -> bool:
    return trainer.cfg.parallel == "fsdp" and trainer.info.distributed


def _model_to_save(trainer) -> hybrid_lm.HybridLM | None:
    """The unsharded model on rank 0 (None elsewhere); under FSDP2 a CPU copy assembled from the full state."""
    if not _sharded(trainer):
        return trainer.raw if trainer.info.is_main else None
    state = get_model_state_dict(trainer.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not trainer.info.is_main:
        return None
    model = hybrid_lm.build_model(trainer.raw.config, device="meta")
    model.load_state_dict(state, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def save_training_state(trainer) -> None:
    """Write `RUN/checkpoints/step_XXXXXXXX/` (see `checkpoint.py`); every rank must call it."""
    rng = gather_objects(ckpt_io.capture_rng_state(), trainer.info)
    full = _sharded(trainer)
    optim_state = get_optimizer_state_dict(trainer.raw, trainer.optimizer,
                                           options=StateDictOptions(full_state_dict=full, cpu_offload=full))
    model = _model_to_save(trainer)
    if not trainer.info.is_main:
        return
    state = {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "world_size": trainer.info.world_size,
             "scheduler": trainer.scheduler.state_dict(), "data": trainer.batches.state_dict(), "rng": rng}
    tokenizer = trainer.prepared.tokenizer_path
    # absolute, so the saved config still names this run wherever it is loaded from
    saved_cfg = dataclasses.replace(trainer.cfg, out_dir=str(trainer.run_dir.resolve()))
    writers = {
        "model": lambda d: hybrid_lm.save_model(model, d),
        "optimizer": lambda d: torch.save(optim_state, d / "optimizer.pt"),
        "trainer_state": lambda d: torch.save(state, d / "trainer_state.pt"),
        "train_config": lambda d: (d / "train_config.yaml").write_text(dump_train_config(saved_cfg)),
    }
    if tokenizer is not None:
        writers["tokenizer"] = lambda d: _copy_tokenizer(Path(tokenizer).parent, d)
    ckpt_io.write_checkpoint(trainer.run_dir, trainer.step, writers)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def load_training_state(trainer, ckpt_dir: Path) -> None:
    """Restore optimizer, schedule position, data position, counters and RNG (model weights are already loaded)."""
    state = ckpt_io.load_trainer_state(ckpt_dir)
    full = _sharded(trainer)
    # the checkpoint's param groups carry its weight_decay, betas and eps: this run's config (e.g. a --set on
    # resume) applies instead, as it does for the schedule; only the moments and step counts carry over
    configured = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    try:
        set_optimizer_state_dict(trainer.raw, trainer.optimizer, ckpt_io.load_optimizer_state(ckpt_dir),
                                 options=StateDictOptions(full_state_dict=full) if full else None)
    except RuntimeError:  # e.g. "Missing optimizer state for parameter ...": name the likely cause
        _check_same_dsa_stage(trainer, ckpt_dir)
        raise
    for group, settings in zip(trainer.optimizer.param_groups, configured):
        group.update(settings)
    sched = {k: v for k, v in state["scheduler"].items() if k != "base_lrs"}
    sched["lr_lambdas"] = [None] * len(trainer.scheduler.lr_lambdas)
    trainer.scheduler.load_state_dict(sched)
    lr_fn = trainer.scheduler.lr_lambdas[0]  # this run's schedule at the saved step (it may be longer)
    for group, base in zip(trainer.optimizer.param_groups, trainer.scheduler.base_lrs):
        group["lr"] = base * lr_fn(trainer.scheduler.last_epoch)
    trainer.batches.load_state_dict(state["data"])
    trainer.step, trainer.tokens_seen = int(state["step"]), int(state["tokens_seen"])
    rng = state["rng"]
    if len(rng) != trainer.info.world_size:
        warnings.warn(f"{ckpt_dir} was saved by {len(rng)} ranks, this run has {trainer.info.world_size}: the data "
                      "order carries over but random streams (e.g. dropout) will differ", stacklevel=2)
    ckpt_io.restore_rng_state(rng[min(trainer.info.rank, len(rng) - 1)])


def _check_same_dsa_stage(trainer, ckpt_dir: Path) -> None:
    """Each DSA stage trains other parameters, so the optimizer state of one may not fit another."""
    saved_cfg = Path(ckpt_dir) / "train_config.yaml"
    saved = yaml.safe_load(saved_cfg.read_text()) if saved_cfg.is_file() else None
    stage = saved.get("dsa_stage") if isinstance(saved, dict) else None
    if stage is not None and stage != trainer.cfg.dsa_stage:
        raise ValueError(f"--resume: {ckpt_dir} was trained with dsa_stage: {stage}, this config has dsa_stage: "
                         f"{trainer.cfg.dsa_stage}, which trains other parameters. To switch stages start a new run "
                         f"from it (init_from: {ckpt_dir}, another --out); to continue it keep dsa_stage: {stage}")
