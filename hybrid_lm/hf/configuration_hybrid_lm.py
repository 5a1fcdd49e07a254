"""The transformers config of an exported hybrid_lm model (`model_type: hybrid_lm`).

Shipped verbatim beside the generated `modeling_hybrid_lm.py`, so it imports only transformers. It carries the
package's whole model config: every field sits at the top level of config.json under its own name, which is the
Hugging Face name where a concept maps (`hidden_size`, `num_hidden_layers`, ...), and `hybrid_lm_fields` lists them.
Two are renamed because transformers gives those names another meaning: the per-layer mixer names (`attention`,
`dsa`, `gated_deltanet` or an alias) are `hybrid_layer_types`, the zoo name is `zoo_name`. `layer_types` is derived
in transformers' vocabulary (`full_attention`, `sliding_attention`, `indexed_attention`, `linear_attention`) for
tools that read it; the model never does. No tensors, so no shapes.
"""

import copy

from transformers import PretrainedConfig

# config.json key of each native field whose own name means something else to transformers
_RENAMED = {"layer_types": "hybrid_layer_types", "name": "zoo_name"}
_EXPLICIT = ("vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
             "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings", "rope_theta",
             "rms_norm_eps", "tie_word_embeddings", "initializer_range", "name", "mixers")
_HF_LAYER_TYPES = {"attention": "full_attention", "dsa": "indexed_attention", "gated_deltanet": "linear_attention"}


class HybridLMConfig(PretrainedConfig):
    model_type = "hybrid_lm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size=32000, hidden_size=512, num_hidden_layers=2, hybrid_layer_types=None,
                 num_attention_heads=8, num_key_value_heads=None, head_dim=None, intermediate_size=None,
                 max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 initializer_range=0.02, zoo_name="", mixers=None, hybrid_lm_fields=None, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.hybrid_layer_types = list(hybrid_layer_types or ["attention"] * num_hidden_layers)
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        if head_dim is None and hidden_size % num_attention_heads == 0:
            head_dim = hidden_size // num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.zoo_name = zoo_name
        self.mixers = copy.deepcopy(mixers) if mixers is not None else {}
        self.hybrid_lm_fields = list(hybrid_lm_fields or _EXPLICIT)
        self.use_cache = use_cache
        kwargs.pop("layer_types", None)  # derived below, never read back
        self.layer_types = [self._hf_layer_type(t) for t in self.hybrid_layer_types]
        # further native fields (e.g. `moe`) arrive in kwargs; transformers stores unknown keys as attributes
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _hf_layer_type(self, layer_type):
        settings = self.mixers.get(layer_type) or {}
        mixer = settings.get("type", layer_type)
        if mixer == "attention" and settings.get("sliding_window") is not None:
            return "sliding_attention"
        return _HF_LAYER_TYPES.get(mixer, mixer)

    @classmethod
    def from_native_dict(cls, native, **kwargs):
        """From hybrid_lm's `config_to_dict(model.config)`; `kwargs` add transformers fields (eos_token_id, ...)."""
        reserved = set(PretrainedConfig().to_dict()) - set(_EXPLICIT) - {"use_cache"}
        clash = sorted(k for k in native if _RENAMED.get(k, k) in reserved or k == "hybrid_lm_fields")
        if clash:
            raise ValueError(f"model config fields {clash} mean something else to transformers; rename them in "
                             f"hybrid_lm or map them in _RENAMED of configuration_hybrid_lm.py")
        fields = {_RENAMED.get(k, k): copy.deepcopy(v) for k, v in native.items()}
        return cls(**fields, hybrid_lm_fields=list(native), **kwargs)

    def to_native_dict(self):
        """The dict hybrid_lm's `config_from_dict` builds the model config from."""
        return {k: copy.deepcopy(getattr(self, _RENAMED.get(k, k))) for k in self.hybrid_lm_fields}


__all__ = ["HybridLMConfig"]
