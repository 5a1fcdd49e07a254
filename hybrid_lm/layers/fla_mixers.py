"""fla's other token mixers in the registry: `fla_kda`, `fla_gla`, `fla_mamba2`, `fla_deltanet`, `fla_hgrn2`, ...

flash-linear-attention (fla, the `gpu` extra) ships many linear-time layers beside the Gated DeltaNet that
`gated_deltanet.py` reimplements. Each one in `FLA_LAYERS` is registered here under its own name, always, so a YAML
that uses one validates (and `hybrid-lm zoo` lists it) on any machine; *building* one needs fla and a CUDA GPU, and
says so clearly when either is missing. The mixer wraps the fla layer as `mixer.layer` (so its parameters are
`layers.<i>.mixer.layer.q_proj.weight`, ...) and adapts the block's call to fla's:

    mixer(x [B, T, C], seq, cache)  ->  fla_layer(hidden_states=x, past_key_values=..., use_cache=..., cu_seqlens=...)

Settings: the fla layer's own keyword arguments, flat under the mixer's section, checked against the fla class's
signature (when fla is importable) with an error listing the valid keys. `hidden_size` and `layer_idx` come from the
model and may not be set. Where fla's defaults ignore the model's width, they are derived from it (`defaults` in
`FLA_LAYERS`): layers sized by `num_heads` x `head_dim` (KDA, GatedDeltaNet, GatedDeltaProduct, Comba, MesaNet)
take the model's `num_attention_heads` x `head_dim`, as our own `gated_deltanet` does; Mamba takes
`intermediate_size = 2 * hidden_size`, Mamba2 `num_heads = expand * hidden_size / head_dim`. Keys the YAML gives
win; a derived key the installed fla's class does not take is left out.

    # GPU only: needs `pip install -e ".[gpu]"` and a CUDA device
    layer_pattern: [fla_kda, fla_kda, fla_kda, attention]
    mixers:
      fla_kda: {num_heads: 8, head_dim: 128}
      gla: {type: fla_gla, expand_k: 0.5, num_heads: 4}   # an alias, as for any mixer

Packed documents (`cu_seqlens`): passed to layers whose forward takes them (fla's chunked kernels keep documents
apart); a layer that ignores them (fla's Mamba / Mamba2, any `mode: fused_chunk`) runs once per document instead,
so no state crosses a boundary either way. Decoding: our per-layer cache dict is handed to fla as its cache for
that layer (fla's `recurrent_state` / `conv_state` / `attn_state` entries live in it), so prefill + token-by-token
`generate` work; Mamba and Mamba2 step one token at a time after the prefill (more raises NotImplementedError).
`fla_simple_gla` does not train on Hopper with 3.4 <= Triton < 3.7.1 under fla <= 0.6.0 (fla refuses its gated
backward there, issue #640); the mixer says so at the first forward that wants gradients.
Not supported: HF export (the exported file bundles only the built-in mixers), RWKV-7 (needs the first layer's
values passed between layers). Init: the model's generic init covers fla's Linear layers (o_proj scaled like ours);
fla's own parameters (A_log, dt_bias, D, ...) keep fla's initialisation.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..registry import Mixer, MixerConfig, register_mixer
from .gated_deltanet import state_flops_per_token

REQUIRES = "fla (pip install -e \".[gpu]\") and a CUDA GPU"
RESERVED = ("hidden_size", "d_model", "layer_idx")  # set from the model


def _heads_from_model(model, given: dict) -> dict:
    return {"num_heads": model.num_attention_heads, "head_dim": model.head_dim}


def _mamba_width(model, given: dict) -> dict:
    return {"intermediate_size": 2 * model.hidden_size}


def _mamba2_heads(model, given: dict) -> dict:
    head_dim, expand = given.get("head_dim", 64), given.get("expand", 2)
    return {"num_heads": max(1, int(expand * model.hidden_size) // head_dim)}


def _gated_chunk_backward_refused() -> str | None:
    """Why fla's simple GLA cannot train on this machine, or None. fla <= 0.6.0 refuses its gated `chunk_bwd_dqkwg`
    on Hopper with 3.4 <= Triton < 3.7.1 (fla issue #640: those Tritons miscompile it), and its tilelang replacement
    rejects simple GLA, whose backward keeps the states in fp32; fla's own error, raised only in the backward, says
    to install tilelang even where it is installed. Read from fla's own flags; None where fla does not say."""
    try:
        fla, utils = importlib.import_module("fla"), importlib.import_module("fla.utils")
        from packaging.version import Version
        old_fla = Version(str(fla.__version__)) <= Version("0.6.0")
    except Exception:
        return None
    hopper, above_3_4, above_3_7_1 = (getattr(utils, n, None) for n in
                                       ("IS_NVIDIA_HOPPER", "TRITON_ABOVE_3_4_0", "TRITON_ABOVE_3_7_1"))
    if not (old_fla and hopper is True and above_3_4 is True and above_3_7_1 is False):
        return None
    triton = getattr(sys.modules.get("triton"), "__version__", "?")  # fla imports it
    return (f"fla {fla.__version__} refuses the gated chunked backward on Hopper GPUs with Triton {triton} "
            f"(>= 3.4, < 3.7.1; fla issue #640), and its tilelang fallback does not cover simple GLA's fp32 states. "
            f"Upgrade triton to >= 3.7.1, or train fla_gla (per-key gates) or fla_retnet (fixed decay), which train "
            f"here; without gradients (evaluation, generation) this mixer runs")


@dataclass(frozen=True)
class FlaLayer:
    module: str
    cls: str
    defaults: Callable[[Any, dict], dict] | None = None  # derived defaults for keys the YAML leaves out
    one_token_steps: bool = False  # its cached path steps one token at a time (Mamba's selective_state_update)
    training_refused: Callable[[], str | None] | None = None  # why its chunked backward cannot run here, or None


FLA_LAYERS: dict[str, FlaLayer] = {
    "fla_kda": FlaLayer("fla.layers.kda", "KimiDeltaAttention", _heads_from_model),
    "fla_gla": FlaLayer("fla.layers.gla", "GatedLinearAttention"),
    "fla_simple_gla": FlaLayer("fla.layers.simple_gla", "SimpleGatedLinearAttention",
                               training_refused=_gated_chunk_backward_refused),
    "fla_deltanet": FlaLayer("fla.layers.delta_net", "DeltaNet"),
    "fla_gated_deltanet": FlaLayer("fla.layers.gated_deltanet", "GatedDeltaNet", _heads_from_model),
    "fla_gated_deltaproduct": FlaLayer("fla.layers.gated_deltaproduct", "GatedDeltaProduct", _heads_from_model),
    "fla_comba": FlaLayer("fla.layers.comba", "Comba", _heads_from_model),
    "fla_hgrn": FlaLayer("fla.layers.hgrn", "HGRNAttention"),
    "fla_hgrn2": FlaLayer("fla.layers.hgrn2", "HGRN2Attention"),
    "fla_retnet": FlaLayer("fla.layers.multiscale_retention", "MultiScaleRetention"),
    "fla_linear_attn": FlaLayer("fla.layers.linear_attn", "LinearAttention"),
    "fla_rwkv6": FlaLayer("fla.layers.rwkv6", "RWKV6Attention"),
    "fla_gsa": FlaLayer("fla.layers.gsa", "GatedSlotAttention"),
    "fla_lightnet": FlaLayer("fla.layers.lightnet", "LightNetAttention"),
    "fla_mesa_net": FlaLayer("fla.layers.mesa_net", "MesaNet", _heads_from_model),
    "fla_mamba": FlaLayer("fla.layers.mamba", "Mamba", _mamba_width, one_token_steps=True),
    "fla_mamba2": FlaLayer("fla.layers.mamba2", "Mamba2", _mamba2_heads, one_token_steps=True),
}


class FlaUnavailable(RuntimeError):
    """fla (or the layer class) cannot be imported."""


def fla_class(name: str) -> type:
    """The fla layer class behind registered name `name`; FlaUnavailable (saying what to install) if it won't import."""
    entry = FLA_LAYERS[name]
    try:
        module = importlib.import_module(entry.module)
    except Exception as e:  # not installed, or a broken install (triton without a driver)
        raise FlaUnavailable(
            f"mixer {name!r} wraps fla's {entry.cls} ({entry.module}), but it does not import "
            f"({type(e).__name__}: {e}); install the GPU extra on a CUDA machine (pip install -e \".[gpu]\"), "
            f"or use a built-in mixer (attention, dsa, gated_deltanet) on CPU") from None
    if not hasattr(module, entry.cls):
        raise FlaUnavailable(f"mixer {name!r}: the installed fla has no {entry.module}.{entry.cls}; upgrade "
                             f"flash-linear-attention (pip install -U flash-linear-attention)")
    return getattr(module, entry.cls)


def _named_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments `cls.__init__` names (a trailing **kwargs swallows typos, so it does not count)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _takes_cu_seqlens(cls: type) -> bool:
    """Whether the layer's forward reads packed-document offsets (else documents are run one by one)."""
    if "cu_seqlens" in inspect.signature(cls.forward).parameters:
        return True
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return re.search(r"""kwargs(\.get\(|\[)\s*['"]cu_seqlens['"]""", source) is not None


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _check_device(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cuda":
        raise RuntimeError(f"mixer {name!r} runs fla's Triton kernels and got inputs on {x.device}; move the model "
                           f"and inputs to a CUDA device (model.cuda())")


@dataclass
class FlaMixerConfig(MixerConfig):
    """The fla layer's keyword arguments, given flat under `mixers.<name>` (collected in `options`)."""

    options: dict[str, Any] = field(default_factory=dict, metadata={"extra_keys": True})
    fla_name = ""  # the registered name; set on each name's subclass (not a dataclass field)

    def validate(self, model, where):
        for key in RESERVED:
            if key in self.options:
                raise ValueError(f"{where}.{key} = {self.options[key]!r}: set by the model (hidden_size = "
                                 f"{model.hidden_size}, layer_idx = the layer's index); remove it")
        try:
            cls = fla_class(self.fla_name)
        except FlaUnavailable:
            return  # checked again, with the reason, when the model is built
        self.check_keys(cls, where)

    def check_keys(self, cls: type, where: str) -> None:
        valid = sorted(set(_named_parameters(cls)) - set(RESERVED))
        for key, value in self.options.items():
            if key not in valid:
                raise ValueError(f"{where}: unknown key {key!r} = {value!r} for fla's {cls.__name__}; "
                                 f"valid keys: {', '.join(valid)}")

    def layer_kwargs(self, cls: type, model, layer_idx: int) -> dict:
        """What the fla class is built with: derived defaults (those its signature takes), then the YAML's options,
        then the model's width and the layer's index."""
        derived = FLA_LAYERS[self.fla_name].defaults
        named = _named_parameters(cls)
        kwargs = {k: v for k, v in derived(model, self.options).items() if k in named} if derived else {}
        kwargs.update(self.options)
        kwargs.update(hidden_size=model.hidden_size, layer_idx=layer_idx)
        return kwargs


class _LayerCache:
    """fla's cache protocol (`len`, `[layer_idx]`, `update`, `get_seq_length`) over one layer's state dict of our
    decoding cache: fla's `recurrent_state`, `conv_state`, `attn_state`, `ffn_state` entries live in that dict."""

    KEYS = ("recurrent_state", "attn_state", "conv_state", "ffn_state")

    def __init__(self, layer_idx: int, state: dict):
        self.layer_idx, self.state = layer_idx, state

    def __len__(self) -> int:  # fla reads `len(cache) > layer_idx` as "this layer has a state"
        return self.layer_idx + 1 if "seen_tokens" in self.state else self.layer_idx

    def __getitem__(self, layer_idx: int) -> dict:
        if layer_idx != self.layer_idx or "seen_tokens" not in self.state:
            raise KeyError(f"no cached state for layer {layer_idx}")
        return self.state

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.state.get("seen_tokens", 0)

    def update(self, recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None, layer_idx=None,
               offset=1, cache_kwargs=None, **_) -> dict:
        if "seen_tokens" not in self.state:
            self.state.update(dict.fromkeys(self.KEYS), seen_tokens=0)
        if attn_state is not None:  # key/value-like states grow along dim 1, within an optional window
            window = (cache_kwargs or {}).get("window_size")
            old = self.state["attn_state"]
            grown = tuple(attn_state) if old is None else tuple(torch.cat([a, b], 1) for a, b in zip(old, attn_state))
            self.state["attn_state"] = tuple(s[:, -window:] for s in grown) if window else grown
        for key, value in (("recurrent_state", recurrent_state), ("conv_state", conv_state),
                           ("ffn_state", ffn_state)):
            if value is not None:
                self.state[key] = value
        self.state["seen_tokens"] += offset if offset is not None else 1
        return self.state


class FlaMixer(Mixer):
    """One fla layer (`self.layer`) behind the block's mixer interface."""

    cache_kind = "recurrent"

    def __init__(self, config, layer_idx: int, mixer_config: FlaMixerConfig):
        super().__init__()
        name = mixer_config.fla_name
        cls = fla_class(name)  # raises with what to install
        if not _cuda_available():
            raise RuntimeError(f"mixer {name!r} runs fla's Triton kernels, which need a CUDA GPU, and "
                               f"torch.cuda.is_available() is False; build this model on a GPU machine, or use a "
                               f"built-in mixer (attention, dsa, gated_deltanet) for CPU runs")
        mixer_config.check_keys(cls, f"mixers.{config.layer_types[layer_idx]}")
        self.fla_name, self.layer_idx = name, layer_idx
        kwargs = mixer_config.layer_kwargs(cls, config, layer_idx)
        try:
            self.layer = cls(**kwargs)
        except (AssertionError, ValueError, TypeError) as e:
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise ValueError(f"mixer {name!r}: fla's {cls.__name__}({args}) refused its settings: "
                             f"{str(e) or type(e).__name__}; change them under "
                             f"mixers.{config.layer_types[layer_idx]}") from None
        self.varlen = _takes_cu_seqlens(cls) and kwargs.get("mode") != "fused_chunk"
        self.one_token_steps = FLA_LAYERS[name].one_token_steps
        refused = FLA_LAYERS[name].training_refused
        chunked = getattr(self.layer, "mode", "chunk") == "chunk"  # fused_recurrent has its own backward
        self.training_refused = refused() if refused is not None and chunked else None

    def _call(self, x, cache=None, cu_seqlens=None):
        extra = {"cu_seqlens": cu_seqlens} if cu_seqlens is not None else {}
        past = _LayerCache(self.layer_idx, cache) if cache is not None else None
        out = self.layer(x, attention_mask=None, past_key_values=past, use_cache=cache is not None, **extra)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, x, seq, cache=None):
        _check_device(x, self.fla_name)
        if self.training_refused and torch.is_grad_enabled() and x.requires_grad:  # before the forward's work
            raise RuntimeError(f"mixer {self.fla_name!r} cannot train on this machine: {self.training_refused}")
        if cache is not None and self.one_token_steps and "seen_tokens" in cache and x.shape[1] != 1:
            raise NotImplementedError(f"mixer {self.fla_name!r}: fla's cached path steps one token at a time after "
                                      f"the prefill, got {x.shape[1]} tokens; feed them one by one")
        cu = seq.cu_seqlens
        if cu is None or cu.numel() <= 2:
            return self._call(x, cache)
        if self.varlen:
            return self._call(x, cache, cu.long())
        bounds = cu.tolist()  # one call per document: the layer would carry its state across the boundary
        return torch.cat([self._call(x[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a], dim=1)

    def flops_per_token(self, context_len: int) -> float:
        # estimated as for gated_deltanet; 0 where the layer's state shape is not recognised
        dims = _state_dims(self.layer)
        return 0.0 if dims is None else state_flops_per_token(*dims)


def _state_dims(layer: nn.Module) -> tuple[int, int, int] | None:
    """(state heads, key dim, value dim) read from an fla layer's attributes."""
    def get(*names):  # the first of these attributes the layer has as an int
        return next((getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), int)), None)

    heads = get("num_v_heads", "num_heads")
    if hasattr(layer, "ssm_state_size"):  # Mamba2: [heads, head_dim, state]; Mamba: one state row per channel
        k = layer.ssm_state_size
        return (heads, k, layer.head_dim) if get("head_dim") else (layer.intermediate_size, k, 1)
    k, v = get("head_k_dim", "head_f_dim", "head_dim"), get("head_v_dim", "head_i_dim", "head_dim")
    return (heads, k, v) if heads and k and v else None


def _register(name: str) -> None:
    config_cls = type(f"{FLA_LAYERS[name].cls}Config", (FlaMixerConfig,), {"fla_name": name})
    globals()[config_cls.__name__] = config_cls  # a module attribute, so a pickled config finds its class
    register_mixer(name, config=config_cls, requires=REQUIRES)(FlaMixer)


for _name in FLA_LAYERS:
    _register(_name)
