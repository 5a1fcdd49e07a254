"""Setting up what the training loop needs: seeds, the model for a training config and its DSA stage, precision.

The model comes from a model YAML (fresh weights), from `init_from` (a saved model, checkpoint or run, e.g. one
converted from dense to DSA), or, when resuming, from the checkpoint itself so architecture and weights match.
"""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

import hybrid_lm
from hybrid_lm.model.loss import next_token_targets
from hybrid_lm.zoo import find_config

__all__ = ["seed_everything", "deterministic_algorithms", "build_training_model", "configure_dsa_stage",
           "autocast_context", "num_predictions"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextmanager
def deterministic_algorithms(device: torch.device):
    """On CPU, ask torch for deterministic kernels (warn-only: CPU kernels are deterministic already, this only
    flags a rare exception); left alone on GPU, where it would slow kernels down. Restored on exit."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _model_from_yaml(cfg, vocab_size: int) -> hybrid_lm.HybridLM:
    overrides = dict(cfg.model_overrides)
    # the model YAML's vocab_size is a placeholder: a fresh model takes the tokenizer's
    overrides.setdefault("vocab_size", vocab_size)
    if overrides["vocab_size"] < vocab_size:
        raise ValueError(f"model_overrides.vocab_size = {overrides['vocab_size']} is smaller than the tokenizer's "
                         f"vocabulary ({vocab_size} tokens)")
    # applied to the YAML as written (a path or a zoo name), so sizes it leaves out follow the overridden ones
    return hybrid_lm.build_model(hybrid_lm.load_config(find_config(cfg.model), overrides))


def _model_from_saved(path: str, overrides: dict) -> hybrid_lm.HybridLM:
    model = hybrid_lm.load_model(path)
    if not overrides:
        return model
    changed = hybrid_lm.build_model(hybrid_lm.config_replace(model.config, **overrides), device="meta")
    try:
        changed.load_state_dict(model.state_dict(), strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"model_overrides {overrides} change the parameters of {path}, so its weights no longer "
                         f"fit ({str(e).splitlines()[0]}); only change settings that keep the shapes, or use "
                         "`hybrid-lm convert` to add layers") from None
    if changed.config.tie_word_embeddings:
        changed.lm_head.weight = changed.embed_tokens.weight
    return changed


def build_training_model(cfg, vocab_size: int, resume_dir: Path | None) -> hybrid_lm.HybridLM:
    """The model to train, in fp32 on CPU (the trainer moves it)."""
    if resume_dir is not None:
        # the checkpoint's architecture and weights; model_overrides apply as for init_from (settings that keep the
        # shapes, e.g. a new index_topk; those the run started with are already in the checkpoint's config)
        model = _model_from_saved(str(resume_dir), cfg.model_overrides)
    elif cfg.init_from is not None:
        model = _model_from_saved(cfg.init_from, cfg.model_overrides)
    else:
        model = _model_from_yaml(cfg, vocab_size)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"the model has vocab_size = {model.config.vocab_size} but the tokenizer has {vocab_size} "
                         "tokens; train with the tokenizer the model was trained with (data.tokenizer)")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len = {cfg.seq_len} exceeds the model's max_position_embeddings = "
                         f"{model.config.max_position_embeddings}; lower seq_len or raise it in model_overrides")
    return model.float()


def configure_dsa_stage(model: hybrid_lm.HybridLM, stage: str, indexer_loss_weight: float) -> None:
    """Set the stage and freeze what it does not train.

    dense_warmup trains the indexers alone. In "none" the indexers get no gradient at all (top-k selection is not
    differentiable and no KL is computed), so they are frozen; DDP would otherwise wait for their gradients.
    """
    indexer = {id(p) for p in model.indexer_parameters()}
    if stage != "none" and not indexer:
        raise ValueError(f"dsa_stage: {stage} needs DSA layers, but model {model.config.name or '?'} has none "
                         f"(layer types {sorted(set(model.config.layer_types))}); set dsa_stage: none (or --set "
                         "dsa_stage=none)")
    model.set_dsa_stage(stage)
    model.set_indexer_loss_weight(1.0 if stage == "dense_warmup" else indexer_loss_weight)
    for p in model.parameters():
        p.requires_grad_(id(p) in indexer if stage == "dense_warmup" else stage == "sparse" or id(p) not in indexer)
    if stage == "none" and indexer:
        warnings.warn("dsa_stage: none leaves the DSA indexers untrained; from scratch, use dsa_stage: sparse",
                      stacklevel=2)


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The training config's `dtype` on `device`: bf16 autocast on GPU by default, none (fp32) on CPU (CPU bf16 only
    when asked for)."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: str):
    low = autocast_dtype(device, dtype)
    return torch.autocast(device.type, dtype=low) if low is not None else nullcontext()


def num_predictions(batch: dict) -> int:
    """Next-token predictions the model scores in a packed batch: one per token, minus one per segment, minus the
    targets labelled -100 (e.g. prompts when only answers are trained on), as the model's mean loss counts them."""
    return int((next_token_targets(batch["labels"], batch["cu_seqlens"]) != -100).sum())
