"""Block, model, cache, generation, the chunked LM loss and model I/O. How a config becomes a stack of blocks:
model.py + block.py."""

from .cache import Cache
from .io import CHECKPOINTS_SUBDIR, build_model, checkpoint_dirs, load_model, resolve_model_dir, save_model
from .loss import linear_cross_entropy
from .model import HybridLM, LMOutput

__all__ = ["Cache", "HybridLM", "LMOutput", "build_model", "load_model", "save_model", "resolve_model_dir",
           "checkpoint_dirs", "CHECKPOINTS_SUBDIR", "linear_cross_entropy"]
