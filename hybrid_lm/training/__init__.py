"""Pretraining: training configs, the training loop (single process, DDP or FSDP2), checkpoints and monitoring.

Imports point one way: this package uses `hybrid_lm.model` and `hybrid_lm.data`; nothing there imports it.
"""

from .config import OptimConfig, TrainConfig, apply_overrides, default_config_path, load_train_config
from .trainer import Trainer, TrainResult, train

__all__ = ["OptimConfig", "TrainConfig", "load_train_config", "apply_overrides", "default_config_path", "Trainer",
           "TrainResult", "train"]
