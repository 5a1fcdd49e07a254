"""hybrid_lm: a model zoo for hybrid language models (DeepSeek Sparse Attention, dense attention, Gated DeltaNet)
mixed by YAML. Layout: `ops` (stateless kernels + references) -> `layers` (mixers, registered by name in
`registry`) -> `model` (one Block, one HybridLM) -> `hf` (transformers export); training code lives in `training`."""

from .config import ModelConfig, config_from_dict, config_replace, load_config, save_config
from .model import Cache, HybridLM, LMOutput, build_model, load_model, save_model
from .registry import Mixer, MixerConfig, get_mixer, mixer_names, register_mixer

__version__ = "0.1.0"

__all__ = ["ModelConfig", "load_config", "save_config", "config_from_dict", "config_replace", "HybridLM", "LMOutput",
           "Cache", "build_model", "load_model", "save_model", "Mixer", "MixerConfig", "register_mixer",
           "get_mixer", "mixer_names"]
