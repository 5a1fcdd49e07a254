"""The transformers face of hybrid_lm: `HybridLMForCausalLM` (PreTrainedModel + GenerationMixin) around the native
`HybridLM`, and `HybridLMCache`, a `transformers.Cache` whose layers are the native per-layer state dicts.

A template: in the package it imports the model from `hybrid_lm`; `hybrid-lm export` appends it to the flattened
package modules to make the self-contained `modeling_hybrid_lm.py` that `AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)` loads. Decoding takes the native code path: generate() feeds only the new tokens and each
mixer extends its own state (KV for attention, KV + index keys for DSA, conv + recurrent states for Gated DeltaNet).
Left-padded batches are refused (the ops take no padding mask); positions come from the cache, as natively.
Fine-tuning (e.g. transformers' Trainer): in train mode `loss` is the native trainer's objective, the LM loss plus
the blocks' auxiliary losses (the MoE balance loss), in eval mode the LM loss alone; `num_items_in_batch` is honoured,
and activation checkpointing switches the native model's own (`set_activation_checkpointing`).

Shapes: `input_ids [B, T]`, `logits [B, T, V]`, every cached tensor batch-first `[B, ...]`.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache as TransformersCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import config_from_dict
from ..layers.sequence import GrowingBuffer
from ..model.loss import next_token_targets
from ..model.model import HybridLM
from .configuration_hybrid_lm import HybridLMConfig

# transformers 5 renamed the output's `past_key_values` to `cache`; generate() reads whichever this version has
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class HybridLayerState(dict):
    """One layer's decoding state: the dict its native mixer reads and extends, plus the per-layer calls
    transformers makes on a cache layer (beam reordering, batch expansion/selection, reset)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False
    is_initialized = True

    def map_batch(self, fn) -> None:
        """Apply `fn` to every cached tensor along its batch dim (dim 0, for buffers, conv and recurrent states)."""
        for key, value in self.items():
            if isinstance(value, GrowingBuffer):
                if value.data is not None:
                    value.data = fn(value.data)
            elif isinstance(value, torch.Tensor):
                self[key] = fn(value)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda t: t[indices])

    def reset(self) -> None:
        self.clear()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a hybrid_lm cache cannot be rewound: Gated DeltaNet and conv states keep no history "
                             "(assisted/speculative decoding is not supported)")


class HybridLMCache(TransformersCache):
    """A transformers Cache that is also what the native model expects of a cache: `layers[i]` is the state dict of
    layer i's mixer and `seq_len` the number of tokens seen, so prefill and decoding run the native code."""

    def __init__(self, num_layers: int):
        layers = [HybridLayerState() for _ in range(num_layers)]
        try:
            super().__init__(layers=layers)
        except TypeError:  # transformers 4.x: a Cache takes no layers
            super().__init__()
        self.layers = layers
        self.seq_len = 0

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seq_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows without bound

    def get_max_cache_shape(self, layer_idx: int | None = 0) -> int:
        return -1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError("HybridLMCache is filled by hybrid_lm's own mixers, not by transformers layers")

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        for layer in self.layers:
            layer.clear()
        self.seq_len = 0

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)


class HybridLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HybridLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}
    _is_stateful = True  # recurrent states cannot be rewound: no assisted decoding
    supports_gradient_checkpointing = True

    def __init__(self, config: HybridLMConfig):
        super().__init__(config)
        self.model = HybridLM(config_from_dict(config.to_native_dict(), "config.json"))
        self.post_init()

    @classmethod
    def from_native(cls, model: HybridLM, config: HybridLMConfig) -> "HybridLMForCausalLM":
        """Wrap an existing native model; its tensors are shared, not copied."""
        with torch.device("meta"):
            wrapper = cls(config)
        wrapper.model = model
        return wrapper

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # a DynamicCache cannot hold recurrent states: forward() makes a HybridLMCache instead

    def _init_weights(self, module) -> None:
        # transformers asks for modules whose weights were not loaded; the native initialiser decides their values.
        # Some versions also ask for loaded ones and for containers, relying on guarded nn.init calls, but the native
        # GDN init writes with copy_: only modules that own a parameter not yet loaded are initialised
        own = list(module.parameters(recurse=False))
        if all(getattr(p, "_is_hf_initialized", False) for p in own):
            return
        for name, candidate in self.model.named_modules():
            if candidate is module:
                self.model.init_module(name, module)
                return

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1) -> None:
        # transformers' activation_checkpointing_enable() (Trainer's gradient_checkpointing=True) lands here. The
        # native model checkpoints its own blocks (non-reentrant torch.utils.checkpoint that reports the blocks' aux
        # losses once), so gradient_checkpointing_func and its kwargs are not used
        if enable and every_n_layers != 1:
            raise ValueError(f"every_n_layers={every_n_layers} is not supported: HybridLM checkpoints every block, or "
                             f"the first n blocks with model.model.set_activation_checkpointing(n)")
        self.model.set_activation_checkpointing(bool(enable))
        self.gradient_checkpointing = bool(enable)  # what transformers' is_activation_checkpointing reads

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def new_cache(self) -> HybridLMCache:
        return HybridLMCache(self.config.num_hidden_layers)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: HybridLMCache | None = None,
                past_key_values: HybridLMCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("HybridLMForCausalLM takes input_ids (inputs_embeds are not supported)")
        if output_attentions:
            raise ValueError("output_attentions is not supported: attention weights are never materialised")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, HybridLMCache):
            raise ValueError(f"got a {type(cache).__name__} as cache; pass a HybridLMCache (model.new_cache()) or "
                             f"let generate() make one")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True) and not self.training
        if use_cache and cache is None:
            cache = self.new_cache()
        _check_unpadded(attention_mask, input_ids)
        _check_positions(position_ids, input_ids, cache.seq_len if cache is not None else 0)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        # transformers' Trainer passes `num_items_in_batch` (the scored targets of every micro-batch of the step) to a
        # forward taking **kwargs, and then does not divide the loss by the gradient-accumulation steps itself
        num_items = kwargs.get("num_items_in_batch")
        out = self.model(input_ids, labels=labels if num_items is None else None,
                         cache=cache if use_cache else None, output_hidden_states=bool(output_hidden_states))
        loss = out.loss
        if labels is not None and num_items is not None:
            loss = HybridLM.lm_loss(out.logits, labels, reduction="sum") / num_items
        if labels is not None and self.training and out.aux_loss is not None:
            # the native trainer's objective: the LM loss plus the blocks' auxiliary losses (the MoE balance loss),
            # each micro-batch's share weighted by its scored targets when the Trainer counts them for the step
            share = 1.0 if num_items is None else (next_token_targets(labels)[:, :-1] != -100).sum() / num_items
            loss = loss + out.aux_loss * share
        result = CausalLMOutputWithPast(loss=loss, logits=out.logits, hidden_states=out.hidden_states,
                                        **{_CACHE_FIELD: cache if use_cache else None})
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()


def _check_unpadded(attention_mask, input_ids) -> None:
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError("padded batches are not supported (the attention and Gated DeltaNet ops take no padding "
                         "mask): generate prompts one at a time, or batch prompts of equal length")


def _check_positions(position_ids, input_ids, offset: int) -> None:
    # positions are implied by the cache, as in the native model; anything else (packing, offsets) would be ignored
    if position_ids is None:
        return
    expected = torch.arange(offset, offset + input_ids.shape[1], device=position_ids.device)
    if position_ids.shape[-1] != input_ids.shape[1] or not bool((position_ids == expected).all()):
        raise ValueError("position_ids must count up from the number of cached tokens (0 without a cache); "
                         "other positions are not supported")


__all__ = ["HybridLMCache", "HybridLMForCausalLM", "HybridLayerState"]
