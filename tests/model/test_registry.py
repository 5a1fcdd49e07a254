"""A user registers a mixer from their own code, without editing the package."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import hybrid_lm
from hybrid_lm import Mixer, MixerConfig, register_mixer
from hybrid_lm.registry import unregister_mixer

from .helpers import tiny_config


@dataclass
class TokenShiftConfig(MixerConfig):
    mix: float = 0.5

    def validate(self, model, where):
        if not 0 <= self.mix <= 1:
            raise ValueError(f"{where}.mix = {self.mix}: must be in [0, 1]")


class TokenShift(Mixer):
    """Mixes each token with the previous one (RWKV's token shift): causal, with a one-token decoding state."""

    def __init__(self, config, layer_idx, mixer_config):
        super().__init__()
        self.mix = mixer_config.mix
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, seq, cache=None):
        prev = torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]
        if cache is not None and "last" in cache:
            prev[:, 0] = cache["last"]
        if cache is not None:
            cache["last"] = x[:, -1]
        if seq.cu_seqlens is not None:
            prev[:, seq.cu_seqlens[:-1].long()] = 0
        return self.proj(self.mix * x + (1 - self.mix) * prev)


@pytest.fixture(autouse=True)
def token_shift_registered():
    # registered as a user would, from their own module; removed afterwards so other tests see the built-ins only
    register_mixer("token_shift_test", config=TokenShiftConfig)(TokenShift)
    yield
    unregister_mixer("token_shift_test")


def test_user_mixer_builds_trains_and_decodes():
    assert "token_shift_test" in hybrid_lm.mixer_names()
    cfg = tiny_config(["token_shift_test", "attention"], mixers={"token_shift_test": {"mix": 0.25}})
    model = hybrid_lm.build_model(cfg)
    assert isinstance(model.layers[0].mixer, TokenShift) and model.layers[0].mixer.mix == 0.25
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.layers[0].mixer.proj.weight.grad is not None
    with torch.no_grad():
        cache = model.new_cache()
        steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                            for i in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), model(ids).logits, atol=1e-5, rtol=1e-5)


def test_user_mixer_settings_are_validated():
    with pytest.raises(ValueError, match="mix"):
        tiny_config(["token_shift_test"], mixers={"token_shift_test": {"mix": 2.0}})


def test_registering_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("attention")(TokenShift)
    with pytest.raises(ValueError, match="MixerConfig"):
        register_mixer("x_test", config=dict)
    with pytest.raises(ValueError, match="not registered"):
        unregister_mixer("x_test")
