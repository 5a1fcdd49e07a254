"""Model configuration: a typed dataclass is the truth, YAML its saved form.

A model YAML describes architecture only (training settings live in `train/configs/`). Field names follow Hugging
Face where a concept maps. The layer stack is either an explicit `layer_types` list or a `layer_pattern` that is
tiled over `num_hidden_layers`; code only ever sees the expanded `layer_types`. Each mixer's own settings sit under
`mixers.<name>`; an alias with `type:` gives a registered mixer a second set of settings:

    layer_pattern: [gated_deltanet, gated_deltanet, gated_deltanet, dsa]
    mixers:
      dsa: {index_topk: 256}
      local: {type: attention, sliding_window: 512}   # usable as `local` in the pattern

An optional `moe:` section makes the feed-forward of every layer from `first_k_dense_replace` on a mixture of experts
(`layers/moe.py`); without it every layer keeps the dense SwiGLU of `intermediate_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .registry import MixerConfig, get_mixer, mixer_names
from .utils.typed import from_dict, to_dict

MOE_SCORING = ("softmax", "sigmoid")
MOE_BALANCING = ("aux_loss", "bias", "none")
MOE_BACKENDS = ("auto", "reference", "grouped_mm")


@dataclass
class MoEConfig:
    """Mixture-of-experts settings (names from Hugging Face's Qwen3-Next / DeepSeek-V3 configs).

    Routing: `scoring_func` turns router logits into scores; each token takes its `num_experts_per_tok` best experts
    (within the `topk_group` best of `n_group` expert groups when `n_group > 1`); the mixture weights are the chosen
    scores, renormalised to sum to one if `norm_topk_prob`, times `routed_scaling_factor`. Balancing: `aux_loss`
    adds `aux_loss_coef * (E / K) * sum_e f_e P_e` per layer (1.0 x coef when perfectly balanced); `bias` is
    DeepSeek-V3's auxiliary-loss-free balancing, a per-expert selection bias moved by `bias_update_rate` after each
    optimizer step (`HybridLM.update_moe_balance()`).
    """

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # default: the model's intermediate_size // num_experts_per_tok
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None  # default: moe_intermediate_size * num_shared_experts
    shared_expert_gate: bool = False  # Qwen3-Next's per-token sigmoid gate on the shared expert's output
    scoring_func: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    balancing: str = "aux_loss"
    aux_loss_coef: float = 0.001
    bias_update_rate: float = 0.001
    first_k_dense_replace: int = 0  # layers before this index keep the dense SwiGLU
    backend: str = "auto"

    def validate(self, model: "ModelConfig", where: str) -> None:
        def bad(key, why):
            raise ValueError(f"{where}.{key} = {getattr(self, key)!r}: {why}")

        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "must be a positive integer")
        for key in ("num_shared_experts", "shared_expert_intermediate_size", "first_k_dense_replace"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.num_experts_per_tok > self.num_experts:
            bad("num_experts_per_tok", f"must be <= num_experts = {self.num_experts}")
        if self.num_experts % self.n_group:
            bad("n_group", f"must divide num_experts = {self.num_experts}")
        if self.topk_group > self.n_group:
            bad("topk_group", f"must be <= n_group = {self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
            bad("num_experts_per_tok", f"exceeds the {self.topk_group * (self.num_experts // self.n_group)} "
                                       f"experts of the topk_group = {self.topk_group} groups a token may use")
        if (self.num_shared_experts == 0) != (self.shared_expert_intermediate_size == 0):
            bad("shared_expert_intermediate_size", f"must be 0 exactly when num_shared_experts = "
                                                   f"{self.num_shared_experts} is 0")
        if self.shared_expert_gate and not self.num_shared_experts:
            bad("shared_expert_gate", "needs a shared expert (num_shared_experts >= 1)")
        if self.first_k_dense_replace >= model.num_hidden_layers:
            bad("first_k_dense_replace", f"leaves no MoE layer among the {model.num_hidden_layers} layers; "
                                         f"remove the 'moe' section for a dense model")
        for key, choices in (("scoring_func", MOE_SCORING), ("balancing", MOE_BALANCING), ("backend", MOE_BACKENDS)):
            if getattr(self, key) not in choices:
                bad(key, f"choose one of {list(choices)}")
        if self.routed_scaling_factor <= 0:
            bad("routed_scaling_factor", "must be > 0")
        for key in ("aux_loss_coef", "bias_update_rate"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: list[str]
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    name: str = ""
    mixers: dict[str, MixerConfig] = field(default_factory=dict)
    mixer_aliases: dict[str, str] = field(default_factory=dict)
    moe: MoEConfig | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            # SwiGLU's 8/3 expansion rounded up to a multiple of 64
            self.intermediate_size = -(-int(8 * self.hidden_size / 3) // 64) * 64
        moe = self.moe
        if moe is not None and moe.moe_intermediate_size is None and isinstance(self.intermediate_size, int):
            moe.moe_intermediate_size = max(1, self.intermediate_size // max(1, moe.num_experts_per_tok))
        if moe is not None and moe.shared_expert_intermediate_size is None and moe.moe_intermediate_size:
            moe.shared_expert_intermediate_size = moe.moe_intermediate_size * moe.num_shared_experts

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has a mixture-of-experts feed-forward (else the dense SwiGLU)."""
        return self.moe is not None and layer_idx >= self.moe.first_k_dense_replace

    def mixer_type(self, layer_type: str) -> str:
        """The registered mixer behind a layer type (itself, or what an alias points to)."""
        return self.mixer_aliases.get(layer_type, layer_type)

    def mixer_config(self, layer_type: str) -> MixerConfig:
        return self.mixers[layer_type]


def _expand_layers(raw: dict, where: str) -> list[str]:
    pattern, types = raw.pop("layer_pattern", None), raw.get("layer_types")
    n = raw.get("num_hidden_layers")
    if pattern is not None and types is not None:
        raise ValueError(f"{where}: give either 'layer_pattern' or 'layer_types', not both")
    if pattern is None:
        if types is None:
            raise ValueError(f"{where}: missing 'layer_types' (or a 'layer_pattern' to tile)")
        return types
    if not isinstance(pattern, list) or not pattern:
        raise ValueError(f"{where}: key 'layer_pattern' = {pattern!r} must be a non-empty list of mixer names")
    if not isinstance(n, int) or n % len(pattern):
        raise ValueError(f"{where}: key 'layer_pattern' of length {len(pattern)} does not tile "
                         f"num_hidden_layers = {n!r}; use a depth that is a multiple of {len(pattern)}, "
                         f"or list every layer under 'layer_types'")
    return list(pattern) * (n // len(pattern))


def _parse_mixers(raw: Any, where: str) -> tuple[dict[str, MixerConfig], dict[str, str]]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: key 'mixers' must be a mapping of mixer name -> settings")
    mixers, aliases = {}, {}
    for name, settings in raw.items():
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"{where}: key 'mixers.{name}' = {settings!r}: must be a mapping of settings "
                             f"(e.g. `{name}: {{index_topk: 64}}`), or empty for the defaults")
        settings = dict(settings or {})
        kind = settings.pop("type", name)
        if kind not in mixer_names():
            raise ValueError(f"{where}: key 'mixers.{name}' has unknown mixer type {kind!r}; "
                             f"registered mixers: {', '.join(mixer_names())} (or give 'type:' for an alias)")
        if kind != name:
            aliases[name] = kind
        mixers[name] = from_dict(get_mixer(kind).config_cls, settings, where, prefix=f"mixers.{name}.")
    return mixers, aliases


def config_from_dict(data: dict, where: str = "<dict>") -> ModelConfig:
    """Strictly build and validate a ModelConfig from a plain dict (as parsed from YAML)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a model config must be a mapping, got {type(data).__name__}")
    raw = dict(data)
    raw["layer_types"] = _expand_layers(raw, where)
    mixers, aliases = _parse_mixers(raw.pop("mixers", None), where)
    raw.pop("mixer_aliases", None)
    if isinstance(raw.get("moe"), dict):  # parsed here so an error names the exact `moe.<key>`
        raw["moe"] = from_dict(MoEConfig, raw["moe"], where, prefix="moe.")
    cfg = from_dict(ModelConfig, raw, where)
    cfg.mixers, cfg.mixer_aliases = mixers, aliases
    for layer_type in dict.fromkeys(cfg.layer_types):  # defaults for mixers used without a section
        if layer_type not in cfg.mixers:
            cfg.mixers[layer_type] = get_mixer(layer_type).config_cls() if layer_type in mixer_names() else None
    validate_config(cfg, where)
    return cfg


def validate_config(cfg: ModelConfig, where: str = "<config>") -> None:
    def bad(key, value, why):
        raise ValueError(f"{where}: key '{key}' = {value!r}: {why}")

    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "max_position_embeddings"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 1:
            bad(key, getattr(cfg, key), "must be a positive integer" +
                (" (hidden_size is not divisible by num_attention_heads: set head_dim)" if key == "head_dim" else ""))
    if not cfg.rope_theta > 0:  # `not >` also refuses nan
        bad("rope_theta", cfg.rope_theta, "must be > 0")
    for key in ("rms_norm_eps", "initializer_range"):
        if not getattr(cfg, key) >= 0:
            bad(key, getattr(cfg, key), "must be >= 0")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        bad("num_key_value_heads", cfg.num_key_value_heads,
            f"must divide num_attention_heads = {cfg.num_attention_heads}")
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        bad("layer_types", cfg.layer_types, f"has {len(cfg.layer_types)} entries but num_hidden_layers = "
            f"{cfg.num_hidden_layers}")
    valid = sorted(set(mixer_names()) | set(cfg.mixer_aliases))
    for i, layer_type in enumerate(cfg.layer_types):
        if layer_type not in valid:
            bad(f"layer_types[{i}]", layer_type, f"unknown mixer; valid choices: {', '.join(valid)}")
    for name, mixer_cfg in cfg.mixers.items():
        mixer_cfg.validate(cfg, f"{where}: mixers.{name}")
    if cfg.moe is not None:
        cfg.moe.validate(cfg, f"{where}: moe")


def load_config(path: str | Path, overrides: dict | None = None) -> ModelConfig:
    """Load a model YAML strictly; errors name the file, the key and the value. `overrides` (top-level keys;
    `mixers` merged per mixer) apply to the YAML as written, so what it leaves out is derived from the new values
    (e.g. head_dim, intermediate_size and num_key_value_heads from a new hidden_size / num_attention_heads)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model config {str(path)!r} does not exist (configs ship in model_configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if overrides and isinstance(data, dict):
        data = _merged(data, overrides)
    return config_from_dict(data, str(path) + (" with overrides" if overrides else ""))


def _merged(data: dict, changes: dict) -> dict:
    """`data` with top-level `changes`; `mixers: {name: {...}}` merges into each mixer's settings."""
    data, changes = dict(data), dict(changes)
    mixer_changes = changes.pop("mixers", None) or {}
    for given, other in (("layer_types", "layer_pattern"), ("layer_pattern", "layer_types")):
        if given in changes:  # a new layer list replaces the old one in either form
            data.pop(other, None)
    data.update(changes)
    mixers = dict(data.get("mixers") or {})
    for name, settings in mixer_changes.items():
        mixers[name] = {**(mixers.get(name) or {}), **settings}
    if mixers:
        data["mixers"] = mixers
    return data


def config_to_dict(cfg: ModelConfig) -> dict:
    data = to_dict(cfg)
    data.pop("mixer_aliases")
    data["mixers"] = {}
    for name, mixer_cfg in cfg.mixers.items():
        entry = to_dict(mixer_cfg)
        if name in cfg.mixer_aliases:
            entry = {"type": cfg.mixer_aliases[name], **entry}
        data["mixers"][name] = entry
    return data


def save_config(cfg: ModelConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_replace(cfg: ModelConfig, **changes) -> ModelConfig:
    """A validated copy with top-level fields changed; `mixers={'dsa': {'index_topk': 8}}` merges settings.
    Fields the original derived (head_dim, intermediate_size, num_key_value_heads, ...) keep their values here;
    `load_config(path, overrides)` re-derives them from the YAML as written."""
    return config_from_dict(_merged(config_to_dict(cfg), changes), "<config_replace>")


__all__ = ["ModelConfig", "MoEConfig", "load_config", "save_config", "config_from_dict", "config_to_dict",
           "config_replace", "validate_config"]
