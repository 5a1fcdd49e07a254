"""Gradients through a decoding cache (a prefix fed in steps, e.g. scoring a continuation
with gradients on) equal those of one full forward for every built-in mixer; in-place cache appends used to break
the backward of attention and DSA layers ("modified by an inplace operation")."""

import pytest
import torch

from tests.model.helpers import tiny_model


@pytest.mark.parametrize("pattern", [["attention"], ["dsa"], ["gated_deltanet"], ["gated_deltanet", "dsa"]])
def test_gradients_through_a_cache_equal_the_full_forward(pattern):
    torch.manual_seed(0)
    model = tiny_model(pattern, torch.float64)
    ids = torch.randint(0, 97, (2, 20))
    full = torch.autograd.grad(model(ids).logits.square().sum(), list(model.parameters()), allow_unused=True)
    cache = model.new_cache()
    parts = [model(ids[:, :12], cache=cache).logits, model(ids[:, 12:17], cache=cache).logits]
    parts += [model(ids[:, i:i + 1], cache=cache).logits for i in range(17, 20)]
    stepped = torch.autograd.grad(torch.cat(parts, 1).square().sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(full, stepped):
        assert (a is None) == (b is None)
        if a is not None:
            # the RMSNorms compute in fp32 even in a fp64 model: their weight gradients sum fp32 rounding
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_gradients_through_an_mla_latent_cache_and_no_grad_steps_after_them():
    from tests.test_mla import mla_model

    torch.manual_seed(0)
    model = mla_model(["dsa", "attention"])
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        expected = model(ids).logits
    cache = model.new_cache()
    first = model(ids[:, :12], cache=cache).logits
    second = model(ids[:, 12:15], cache=cache).logits
    torch.autograd.grad((first.sum() + second.sum()), list(model.parameters()), allow_unused=True)
    with torch.no_grad():  # decoding on after the recorded steps
        rest = [model(ids[:, i:i + 1], cache=cache).logits for i in range(15, 20)]
    torch.testing.assert_close(torch.cat([first, second, *rest], 1), expected, rtol=1e-9, atol=1e-9)
