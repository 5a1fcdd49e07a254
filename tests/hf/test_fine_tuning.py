"""The wrapper as transformers' Trainer drives it: the training objective (LM + the blocks' auxiliary losses, as the
native trainer optimises) and activation checkpointing switched by `activation_checkpointing_enable`. Shapes:
`ids [B, T]`."""

import pytest
import torch

from hybrid_lm.config import config_to_dict
from hybrid_lm.hf.configuration_hybrid_lm import HybridLMConfig
from hybrid_lm.hf.modeling_hybrid_lm import HybridLMForCausalLM

from .test_export import MIXED, tiny

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, num_shared_experts=1, aux_loss_coef=0.5)


def wrap(native):
    return HybridLMForCausalLM.from_native(native, HybridLMConfig.from_native_dict(config_to_dict(native.config)))


def test_train_mode_loss_adds_the_moe_balance_loss_eval_mode_does_not():
    torch.manual_seed(0)
    native = tiny(["attention", "gated_deltanet"], moe=MOE)
    hf = wrap(native)
    ids = torch.randint(1, 300, (4, 12))
    hf.train()
    out = native(ids, labels=ids)
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(hf(ids, labels=ids).loss, out.loss + out.aux_loss)
    # the Trainer's split into micro-batches (num_items_in_batch) sums to the whole batch's objective
    total = torch.tensor(4 * 11)
    parts = [hf(ids[i:i + 2], labels=ids[i:i + 2], num_items_in_batch=total).loss for i in (0, 2)]
    halves = [native(ids[i:i + 2], labels=ids[i:i + 2]) for i in (0, 2)]
    torch.testing.assert_close(parts[0] + parts[1], sum(h.loss + h.aux_loss for h in halves) / 2)
    hf.eval()
    torch.testing.assert_close(hf(ids, labels=ids).loss, native(ids, labels=ids).loss)


def test_activation_checkpointing_enable_switches_the_native_blocks_and_keeps_gradients():
    torch.manual_seed(0)
    native = tiny(MIXED)
    hf = wrap(native).train()
    ids = torch.randint(1, 300, (2, 16))

    def grads():
        hf.zero_grad()
        hf(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}

    plain = grads()
    hf.activation_checkpointing_enable()
    assert native.activation_checkpointing is True and hf.is_activation_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    hf.activation_checkpointing_disable()
    assert native.activation_checkpointing is False and not hf.is_activation_checkpointing
    with pytest.raises(ValueError, match="every_n_layers"):
        hf.activation_checkpointing_enable(every_n_layers=2)
