"""Small model configs for tests."""

import hybrid_lm

TINY = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    intermediate_size=48, max_position_embeddings=256, tie_word_embeddings=False,
    mixers={"dsa": {"index_n_heads": 2, "index_head_dim": 8, "index_topk": 8},
            "gated_deltanet": {"num_heads": 2, "num_v_heads": 4, "head_k_dim": 8, "head_v_dim": 8},
            "attention": {"qk_norm": True, "output_gate": True}},
)


def tiny_config(layer_types, **overrides):
    mixers = {k: dict(v) for k, v in TINY["mixers"].items()}
    for name, settings in overrides.pop("mixers", {}).items():
        mixers[name] = {**mixers.get(name, {}), **settings}
    data = {**TINY, **overrides, "mixers": mixers, "layer_types": list(layer_types),
            "num_hidden_layers": len(layer_types)}
    return hybrid_lm.config_from_dict(data, "<test>")


def tiny_model(layer_types, dtype=None, **overrides):
    model = hybrid_lm.build_model(tiny_config(layer_types, **overrides))
    return model.to(dtype) if dtype is not None else model


def prefill_then_steps(model, ids, prefill: int):
    """(full-forward logits, logits of a cached prefill of `prefill` tokens then one token at a time), no grad."""
    import torch

    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :prefill], cache=cache).logits]
        steps += [model(ids[:, i:i + 1], cache=cache).logits for i in range(prefill, ids.shape[1])]
    return full, torch.cat(steps, 1), cache
