"""`generate` / `sample_next`: bad sampling settings are named, not a torch error."""

import pytest
import torch

from hybrid_lm.model.generation import sample_next

from .helpers import tiny_model


def test_negative_top_p_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="top_p = -0.1"):
        sample_next(torch.randn(2, 10), True, 1.0, None, -0.1, None)
    assert sample_next(torch.tensor([[0.0, 3.0, 1.0]]), True, 1.0, None, 0.0, None).tolist() == [1]  # 0: greedy


def test_negative_max_new_tokens_is_a_value_error_not_the_prompt_back():
    model = tiny_model(["attention"])
    prompt = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="max_new_tokens = -3"):
        model.generate(prompt, max_new_tokens=-3)
    assert torch.equal(model.generate(prompt, max_new_tokens=0), prompt)


def test_an_interrupted_generate_gives_back_the_callers_train_mode():
    model = tiny_model(["attention"]).train()
    forward, calls = model.forward, []

    def interrupted(*args, **kwargs):  # Ctrl-C during the second decoding step
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    model.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        model.generate(torch.randint(0, 97, (1, 4)), max_new_tokens=5)
    assert model.training
