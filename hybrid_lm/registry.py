"""The mixer registry: one name -> (mixer class, its typed settings).

A *mixer* is the token-mixing sublayer of a block (attention, DSA, Gated DeltaNet, ...). Every mixer has the same
forward signature, so the generic `Block` never branches on its type:

    mixer(x [B, T, C], seq: SequenceInfo, cache: LayerCache | None) -> [B, T, C]

Register your own from any module, without editing this package:

    from dataclasses import dataclass
    from hybrid_lm import MixerConfig, Mixer, register_mixer

    @dataclass
    class MyConfig(MixerConfig):
        width: int = 4

    @register_mixer("my_mixer", config=MyConfig)
    class MyMixer(Mixer):
        def __init__(self, config, layer_idx, mixer_config): ...
        def forward(self, x, seq, cache=None): ...

Then `layer_types: [my_mixer, attention, ...]` (or `layer_pattern`) in a model YAML uses it, with its settings under
`mixers: {my_mixer: {width: 8}}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import nn

if TYPE_CHECKING:
    from .config import ModelConfig


@dataclass
class MixerConfig:
    """Base class of a mixer's typed settings (the `mixers.<name>` section of a model YAML)."""

    def validate(self, model: "ModelConfig", where: str) -> None:
        """Raise ValueError (naming `where`) when these settings do not fit the model."""


class Mixer(nn.Module):
    """Base class of token mixers. Subclasses set what they need as class attributes."""

    # decoding state kind (for documentation / cache construction): "kv", "kv+index", "recurrent", or None
    cache_kind: str | None = None

    def forward(self, x, seq, cache=None):  # pragma: no cover - interface
        raise NotImplementedError

    def flops_per_token(self, context_len: int) -> float:
        """Forward FLOPs per token beyond the linear projections (those are counted from parameters)."""
        return 0.0

    def reset_parameters(self) -> None:
        """Mixer-specific initialisation run after the model's generic init (optional)."""


@dataclass(frozen=True)
class MixerSpec:
    name: str
    cls: type
    config_cls: type
    requires: str | None = None  # what building it needs beyond torch ("fla and a CUDA GPU"); None: runs anywhere


_MIXERS: dict[str, MixerSpec] = {}


def register_mixer(name: str, *, config: type = MixerConfig, overwrite: bool = False,
                   requires: str | None = None) -> Callable[[type], type]:
    """Class decorator that makes `name` usable in `layer_types`. `config` is a MixerConfig dataclass; `requires`
    says what building the mixer needs beyond torch (its name is known, and a YAML using it validates, without)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"mixer name must be an identifier-like string, got {name!r}")
    if not (isinstance(config, type) and issubclass(config, MixerConfig)):
        raise ValueError(f"register_mixer({name!r}): config must be a MixerConfig dataclass, got {config!r}")

    def wrap(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"register_mixer({name!r}) decorates an nn.Module subclass, got {cls!r}")
        if name in _MIXERS and not overwrite and _MIXERS[name].cls is not cls:
            raise ValueError(f"mixer {name!r} is already registered to {_MIXERS[name].cls.__qualname__}; "
                             f"pass overwrite=True to replace it")
        _MIXERS[name] = MixerSpec(name, cls, config, requires)
        return cls

    return wrap


def unregister_mixer(name: str) -> None:
    """Remove a mixer registered with `register_mixer` (e.g. at the end of a test)."""
    if _MIXERS.pop(name, None) is None:
        raise ValueError(f"mixer {name!r} is not registered; registered mixers: {', '.join(sorted(_MIXERS))}")


def get_mixer(name: str) -> MixerSpec:
    _ensure_builtins()
    if name not in _MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(_MIXERS))}")
    return _MIXERS[name]


def mixer_names() -> list[str]:
    _ensure_builtins()
    return sorted(_MIXERS)


def _ensure_builtins() -> None:
    # the built-in mixers register themselves when `hybrid_lm.layers` is imported
    from . import layers  # noqa: F401
