"""fla's token mixers (layers/fla_mixers.py) on a GPU with fla installed: a tiny hybrid of each fla layer plus
attention trains a step in bf16 autocast, keeps packed documents apart, and decodes with the cache as the full
forward computes. Skipped without CUDA or fla; run `pytest tests/gpu/test_fla_mixers.py -q -s`."""

from pathlib import Path

import pytest
import torch

import hybrid_lm
from hybrid_lm.ops import backends

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not backends.has_fla(), reason="needs fla (flash-linear-attention)"),
]

NAMES = ["fla_gla", "fla_kda", "fla_deltanet", "fla_gated_deltanet", "fla_hgrn2", "fla_simple_gla", "fla_retnet",
         "fla_mamba2"]
MODEL = dict(vocab_size=512, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             intermediate_size=512, max_position_embeddings=4096)


def model_for(name, layers=("{n}", "attention", "{n}", "attention")):
    types_ = [t.format(n=name) for t in layers]
    cfg = hybrid_lm.config_from_dict({**MODEL, "layer_types": types_, "num_hidden_layers": len(types_)}, "<gpu>")
    torch.manual_seed(0)
    return hybrid_lm.build_model(cfg).cuda()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", NAMES)
def test_fla_mixer_trains_a_step(name):
    model = model_for(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, MODEL["vocab_size"], (2, 256), device="cuda")
    mixer, why = model.layers[0].mixer, model.layers[0].mixer.training_refused
    if why:  # fla_simple_gla on Hopper with Triton < 3.7.1: the mixer says so before fla would
        with pytest.raises(RuntimeError, match="cannot train on this machine.*Upgrade triton"):
            model(ids, labels=ids)
        mixer.training_refused = None  # and fla does refuse, in the backward: the check is not stale
        with pytest.raises(RuntimeError, match="3.7.1"), torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids, labels=ids).loss.backward()
        pytest.skip(f"{name} does not train on this machine: {why}")
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if ".mixer.layer." in n and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(name, "losses", [round(x, 3) for x in losses])
    assert losses[-1] < losses[0], (name, losses)


@pytest.mark.parametrize("name", NAMES)
def test_fla_mixer_keeps_packed_documents_apart(name):
    model = model_for(name)
    ids = torch.randint(0, MODEL["vocab_size"], (1, 384), device="cuda")
    cu = torch.tensor([0, 100, 384], dtype=torch.int32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(ids, cu_seqlens=cu).logits
        alone = torch.cat([model(ids[:, :100]).logits, model(ids[:, 100:]).logits], dim=1)
        crossed = model(ids).logits
    err, leak = rel(packed[:, 100:], alone[:, 100:]), rel(crossed[:, 100:], alone[:, 100:])
    print(name, f"packed vs alone rel err {err:.2e}; unpacked {leak:.2e}")
    assert err < 2e-2 and leak > 2 * err, (name, err, leak)


@pytest.mark.parametrize("name", NAMES)
def test_fla_mixer_cached_decoding_matches_the_full_forward(name):
    model = model_for(name).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (2, 80), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :72], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                             for i in range(72, 80)]
    err = rel(torch.cat(steps, 1), full)
    print(name, f"cached decoding vs full forward rel err {err:.2e}")
    assert err < 3e-2, (name, err)


def test_fla_gla_in_a_yaml_pattern_with_an_alias(tmp_path):
    yaml_text = "\n".join([
        "vocab_size: 512", "hidden_size: 256", "num_hidden_layers: 4", "num_attention_heads: 4",
        "layer_pattern: [fla_gla, kda, fla_gla, attention]",
        "mixers:", "  fla_gla: {num_heads: 4, expand_k: 0.5, use_short_conv: true}",
        "  kda: {type: fla_kda, head_dim: 64, num_heads: 4}",
    ])
    (tmp_path / "m.yaml").write_text(yaml_text)
    model = hybrid_lm.build_model(hybrid_lm.load_config(tmp_path / "m.yaml")).cuda()
    assert model.layers[0].mixer.layer.use_short_conv and type(model.layers[1].mixer.layer).__name__ == \
        "KimiDeltaAttention"
    ids = torch.randint(0, 512, (1, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="unknown key 'expand_q'"):
        hybrid_lm.config_replace(model.config, mixers={"fla_gla": {"expand_q": 1}})


def test_the_gpu_only_example_config_trains_a_step():
    path = Path(hybrid_lm.__file__).resolve().parents[1] / "model_configs" / "gpu" / "kda-attn-125m.yaml"
    model = hybrid_lm.build_model(hybrid_lm.load_config(path)).cuda()
    ids = torch.randint(0, 32000, (1, 2048), device="cuda")
    cu = torch.tensor([0, 1000, 2048], dtype=torch.int32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, cu_seqlens=cu, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - 10.37) < 1.0  # ~ln(32000) at init
