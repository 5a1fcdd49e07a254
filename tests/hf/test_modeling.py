"""The transformers wrapper in-process (the package's template module, the same code the export flattens): the
cache under beam search, sampling and cache reuse, refused inputs, fresh initialisation."""

import pytest
import torch

import hybrid_lm
from hybrid_lm.config import config_to_dict
from hybrid_lm.hf.configuration_hybrid_lm import HybridLMConfig
from hybrid_lm.hf.modeling_hybrid_lm import HybridLMCache, HybridLMForCausalLM

from .test_export import MIXED, tiny


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    native = tiny(MIXED, tie_word_embeddings=True)
    config = HybridLMConfig.from_native_dict(config_to_dict(native.config), eos_token_id=None, pad_token_id=0)
    return native, HybridLMForCausalLM.from_native(native, config).eval()


def test_beam_search_with_cache_equals_without(pair):
    _, hf = pair
    torch.manual_seed(1)  # with a no-op reorder_cache these beams come out different (checked)
    prompt = torch.randint(1, 300, (2, 9))
    kw = dict(max_new_tokens=8, num_beams=2, do_sample=False, num_return_sequences=2)
    cached = hf.generate(prompt, use_cache=True, **kw)  # reorders the recurrent and KV states between beams
    full = hf.generate(prompt, use_cache=False, **kw)  # recomputes every prefix: no cache to get wrong
    assert torch.equal(cached, full)


def test_sampling_with_cache_equals_without(pair):
    _, hf = pair
    prompt = torch.randint(1, 300, (1, 7))
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, num_return_sequences=2)
    torch.manual_seed(5)
    cached = hf.generate(prompt, use_cache=True, **kw)
    torch.manual_seed(5)
    full = hf.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, full)


def test_prefill_then_steps_equal_native_cache(pair):
    native, hf = pair
    ids = torch.randint(1, 300, (2, 15))
    cache = hf.new_cache()
    with torch.no_grad():
        parts = [hf(ids[:, :9], cache=cache).logits] + [hf(ids[:, t:t + 1], cache=cache).logits for t in range(9, 15)]
        full = native(ids).logits
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 15 and len(cache) == len(MIXED)


def test_cache_batch_operations():
    cache = HybridLMCache(1)
    layer = cache.layers[0]
    layer["state"] = torch.arange(3.0)[:, None].expand(3, 4).clone()
    buf = hybrid_lm.layers.sequence.GrowingBuffer()
    buf.append(torch.arange(3.0)[:, None, None].expand(3, 2, 5).clone())
    layer["k"] = buf
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert layer["state"][:, 0].tolist() == [2, 0, 0] and buf.data[:, 0, 0].tolist() == [2, 0, 0]
    cache.batch_select_indices(torch.tensor([0, 1]))
    cache.batch_repeat_interleave(2)
    assert layer["state"][:, 0].tolist() == [2, 2, 0, 0] and buf.append(torch.zeros(4, 1, 5)).shape == (4, 3, 5)
    with pytest.raises(ValueError, match="cannot be rewound"):
        cache.crop(1)
    cache.reset()
    assert cache.get_seq_length() == 0 and not layer


def test_refused_inputs(pair):
    _, hf = pair
    ids = torch.randint(1, 300, (2, 5))
    with pytest.raises(ValueError, match="padded batches"):
        hf(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="HybridLMCache"):
        from transformers import DynamicCache

        hf(ids, cache=DynamicCache())
    with pytest.raises(ValueError, match="position_ids"):
        hf(ids, position_ids=torch.arange(3, 8)[None].expand(2, 5))
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf(inputs_embeds=torch.zeros(2, 5, 32))
    hf(ids, attention_mask=torch.ones(2, 5, dtype=torch.long), position_ids=torch.arange(5)[None].expand(2, 5))


def test_fresh_model_uses_the_native_initialiser():
    config = HybridLMConfig.from_native_dict(config_to_dict(tiny(MIXED).config))
    torch.manual_seed(3)
    hf = HybridLMForCausalLM(config)
    torch.manual_seed(3)
    native = hybrid_lm.build_model(hybrid_lm.config_from_dict(config.to_native_dict()))
    for (name, got), (_, want) in zip(hf.model.state_dict().items(), native.state_dict().items()):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
    gdn = hf.model.layers[0].mixer
    assert (gdn.A_log.exp() <= 16).all() and (hf.model.norm.weight == 1).all()
    std = hf.model.layers[3].mixer.o_proj.weight.std().item()  # residual outputs: std / sqrt(2 * layers)
    assert 0.3 * 0.02 / 8 ** 0.5 < std < 2 * 0.02 / 8 ** 0.5


def test_transformers_init_pass_leaves_loaded_weights_alone(pair):
    """Some transformers versions call _init_weights on containers and on loaded modules too (flagging loaded
    parameters `_is_hf_initialized`); the native GDN init writes with copy_, so such calls must be no-ops."""
    native, _ = pair
    config = HybridLMConfig.from_native_dict(config_to_dict(native.config))
    hf = HybridLMForCausalLM(config)
    hf.model.load_state_dict(native.state_dict())
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    for p in hf.parameters():
        p._is_hf_initialized = True
    for module in hf.modules():
        hf._init_weights(module)
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())
    gdn = hf.model.layers[0].mixer
    del gdn.A_log._is_hf_initialized  # a weight the checkpoint lacked gets the native init
    hf._init_weights(gdn)
    assert not torch.equal(before["model.layers.0.mixer.A_log"], gdn.A_log)
