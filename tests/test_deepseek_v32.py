"""DeepSeek-V3.2 both ways: tiny random `DeepseekV32ForCausalLM`s from transformers convert into the zoo and give
the same logits with the DSA selection active (index_topk < T), generate the same with the MLA latent cache as a
full forward, and export back to identical tensors that transformers loads; refusals; the zoo's V3.2 configs."""

import json

import pytest
import torch
from safetensors.torch import load_file

import hybrid_lm
from hybrid_lm.cli import main as cli_main
from hybrid_lm.convert import convert_checkpoint
from hybrid_lm.convert_deepseek_v32 import (
    deepseek_v32_config_to_ours,
    export_deepseek_v32,
    ours_to_deepseek_v32_config,
)
from hybrid_lm.zoo import find_config

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV32ForCausalLM"):
    pytest.skip("this transformers has no DeepSeek-V3.2", allow_module_level=True)

T = 24
SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
             routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
             qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
             index_topk=6, index_head_dim=16, index_n_heads=8, max_position_embeddings=64)


def make_v32(folder, seed=0, **changes):
    """A random tiny V3.2 saved by transformers; every tensor is perturbed so norms, biases and the expert
    selection bias are not at their trivial initial values."""
    torch.manual_seed(seed)
    config = transformers.DeepseekV32Config(**{**SMALL, **changes})
    config._attn_implementation = "eager"
    model = transformers.DeepseekV32ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)
    model.save_pretrained(folder)
    return model


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("v32")
    hf = make_v32(root / "hf")
    assert cli_main(["convert", str(root / "hf"), str(root / "ours")]) == 0  # the default command imports it
    return root, hf, hybrid_lm.load_model(root / "ours").eval()


def test_converts_with_the_same_logits_while_the_indexer_selects(converted):
    _, hf, ours = converted
    cfg = ours.config
    assert cfg.layer_types == ["dsa"] * 3 and cfg.moe.first_k_dense_replace == 1 and cfg.moe.balancing == "bias"
    assert cfg.mixers["dsa"].index_topk == 6 < T
    ids = torch.randint(0, 101, (2, T))
    with torch.no_grad():
        expected = hf(ids).logits
        # 8 index heads make an exact tie at the top-k boundary (keys whose every head is relu-zero) unlikely;
        # with a tie, the two implementations could keep different keys
        assert relative_error(ours(ids).logits, expected) < 1e-4
        # the selection matters: keeping every key gives clearly different logits
        for layer in ours._dsa_layers():
            layer.topk = T
        assert relative_error(ours(ids).logits, expected) > 1e-3
        for layer in ours._dsa_layers():
            layer.topk = 6


def test_latent_cache_generation_matches_full_forward(converted):
    _, hf, ours = converted
    model = hybrid_lm.build_model(ours.config).to(torch.float64)
    model.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 101, (2, T))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :4], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                           for i in range(4, T)]
    assert "latent" in cache.layers[0] and "k" not in cache.layers[0]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    out = model.generate(ids[:, :5], max_new_tokens=12)
    with torch.no_grad():
        torch.testing.assert_close(model(out).logits[:, 4:-1].argmax(-1), out[:, 5:], rtol=0, atol=0)


def test_exports_back_to_identical_tensors_that_transformers_loads(converted):
    root, hf, ours = converted
    assert cli_main(["export", str(root / "ours"), str(root / "back"), "--format", "deepseek_v32"]) == 0
    original, exported = load_file(str(root / "hf" / "model.safetensors")), load_file(str(root / "back" /
                                                                                          "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    reloaded = transformers.DeepseekV32ForCausalLM.from_pretrained(root / "back", attn_implementation="eager")
    ids = torch.randint(0, 101, (1, T))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, hf(ids).logits, rtol=0, atol=0)


def test_dense_only_v32_with_tied_embeddings_converts(tmp_path):
    hf = make_v32(tmp_path / "hf", seed=1, first_k_dense_replace=3, tie_word_embeddings=True, num_hidden_layers=2)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ours")
    ours = hybrid_lm.load_model(tmp_path / "ours").eval()
    assert ours.config.moe is None and ours.lm_head.weight is ours.embed_tokens.weight
    ids = torch.randint(0, 101, (2, T))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, hf(ids).logits) < 1e-4


@pytest.mark.parametrize("changes, match", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                           "original_max_position_embeddings": 16}), r"rope_type' = 'yarn'.*unscaled RoPE"),
    (dict(num_key_value_heads=2), r"num_key_value_heads' = 2.*must equal 4"),
    (dict(mlp_layer_types=["sparse", "dense", "sparse"]), r"mlp_layer_types.*MoE layers must follow"),
    (dict(hidden_act="gelu"), r"hidden_act' = 'gelu'"),
])
def test_configs_that_do_not_map_are_refused(changes, match):
    config = transformers.DeepseekV32Config(**SMALL).to_dict()
    with pytest.raises(ValueError, match=match):
        deepseek_v32_config_to_ours({**config, **changes})


def test_export_refuses_a_config_without_a_v32_equivalent(tmp_path):
    cfg = hybrid_lm.load_config(find_config("tiny-hybrid"))
    with pytest.raises(ValueError, match="one kind of layer"):
        ours_to_deepseek_v32_config(cfg)
    model = hybrid_lm.build_model(hybrid_lm.config_replace(hybrid_lm.load_config(find_config("deepseek-v32-tiny")),
                                                           mixers={"dsa": {"rope_interleave": False}}))
    hybrid_lm.save_model(model, tmp_path / "m")
    with pytest.raises(ValueError, match="rope_interleave = False"):
        export_deepseek_v32(tmp_path / "m", tmp_path / "out")


@pytest.mark.parametrize("name", ["deepseek-v32-tiny", "deepseek-v32-125m"])
def test_zoo_configs_build_and_map_to_transformers(name):
    cfg = hybrid_lm.load_config(find_config(name))
    model = hybrid_lm.build_model(cfg, device="meta")
    hf = ours_to_deepseek_v32_config(cfg)
    with torch.device("meta"):
        reference = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**hf))
    assert model.num_parameters() == sum(p.numel() for p in reference.parameters())
    assert deepseek_v32_config_to_ours(json.loads(json.dumps(hf)), name=cfg.name) == cfg


def test_tiny_zoo_config_trains(tmp_path):
    cfg = hybrid_lm.config_replace(hybrid_lm.load_config(find_config("deepseek-v32-tiny")), vocab_size=300)
    model = hybrid_lm.build_model(cfg)
    model.set_dsa_stage("sparse")
    model.set_indexer_loss_weight(0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 300, (1, 80))  # T > index_topk = 64: sparse attention and the indexer KL are live
    losses = []
    for _ in range(3):
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_balance()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] and "dsa/layer0/kl" in out.metrics
    hybrid_lm.save_model(model, tmp_path / "m")
    export_deepseek_v32(tmp_path / "m", tmp_path / "hf")  # a trained zoo model exports to transformers
    reference = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    model.eval()
    # T = index_topk: every key is kept, so exact ties in the young indexer's scores (all-relu-zero keys) cannot
    # make the two implementations keep different keys; the selection itself is compared on the small models above
    with torch.no_grad():
        assert relative_error(model(ids[:, :64]).logits, reference.eval()(ids[:, :64]).logits) < 1e-4
