"""The wrapper's loss under transformers' Trainer contract: a forward with `**kwargs` is taken to accept loss kwargs,
so the Trainer passes `num_items_in_batch` (the scored targets of every micro-batch of the optimiser step) and no
longer divides the loss by the gradient-accumulation steps itself. Shapes: `ids [B, T]`."""

import torch

from hybrid_lm.config import config_to_dict
from hybrid_lm.hf.configuration_hybrid_lm import HybridLMConfig
from hybrid_lm.hf.modeling_hybrid_lm import HybridLMForCausalLM

from .test_export import MIXED, tiny


def test_num_items_in_batch_makes_accumulated_micro_batches_equal_the_whole_batch():
    torch.manual_seed(0)
    native = tiny(MIXED)
    hf = HybridLMForCausalLM.from_native(native, HybridLMConfig.from_native_dict(config_to_dict(native.config)))
    ids = torch.randint(1, 300, (4, 10))
    labels = ids.clone()
    labels[0, :7] = -100  # micro-batches score different numbers of targets
    labels[2, 3:] = -100
    whole = hf(ids, labels=labels, use_cache=False).loss
    # what transformers' Trainer counts and passes with gradient_accumulation_steps = 2 (labels[..., 1:] != -100)
    total = int((labels[:, 1:] != -100).sum())
    parts = [hf(ids[i:i + 2], labels=labels[i:i + 2], use_cache=False, num_items_in_batch=torch.tensor(total)).loss
             for i in (0, 2)]
    # the Trainer sums the micro-batch losses without dividing by the accumulation steps
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-6)
    # without num_items_in_batch the loss stays the mean over the batch's own scored targets
    torch.testing.assert_close(hf(ids[:2], labels=labels[:2], use_cache=False).loss,
                               native(ids[:2], labels=labels[:2]).loss, rtol=1e-6, atol=1e-6)


def test_no_scored_target_in_a_micro_batch_adds_zero():
    torch.manual_seed(0)
    native = tiny(["gated_deltanet", "attention"])
    hf = HybridLMForCausalLM.from_native(native, HybridLMConfig.from_native_dict(config_to_dict(native.config)))
    ids = torch.randint(1, 300, (1, 6))
    loss = hf(ids, labels=torch.full_like(ids, -100), use_cache=False, num_items_in_batch=torch.tensor(5)).loss
    assert loss.item() == 0.0
