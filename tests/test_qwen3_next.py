"""Qwen3-Next weights both ways (`hybrid_lm/convert_qwen3_next.py`): tiny random transformers `Qwen3NextForCausalLM`
models convert into the zoo with the same logits (fp32, eager; relative error < 1e-4) and greedy continuations,
export back to the same tensors, and our `qwen3-next-tiny` zoo config runs unchanged inside transformers.
Shapes: `ids [B, T]`, `logits [B, T, V]`."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import hybrid_lm
from hybrid_lm.cli import main as cli_main
from hybrid_lm.convert import convert_checkpoint
from hybrid_lm.convert_qwen3_next import export_qwen3_next, qwen3_next_config_to_ours

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3NextForCausalLM"):
    pytest.skip("this transformers has no Qwen3-Next", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 97
ZERO_CENTRED = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight",
                "model.norm.weight")
TINY = dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=48, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[0],
            max_position_embeddings=128, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 5000.0,
                                                                              "partial_rotary_factor": 0.5})


def hf_model(**overrides):
    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(
        transformers.Qwen3NextConfig(**{**TINY, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():  # HF inits norms to zero and the router small: perturb so every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name or "dt_bias" in name:
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("overrides", [{}, {"num_experts": 0, "mlp_only_layers": []},
                                       {"mlp_only_layers": [], "tie_word_embeddings": True,
                                        "layer_types": ["full_attention", "linear_attention"] * 2}],
                         ids=["moe-after-dense", "dense", "all-moe-tied"])
def test_converts_with_the_same_logits_and_greedy_continuation(tmp_path, overrides):
    hf = hf_model(**overrides)
    hf.save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "ours", dsa_layers="none")
    ours = hybrid_lm.load_model(tmp_path / "ours").eval()
    ids = torch.randint(0, V, (2, 19))
    assert rel_err(logits(ours, ids), logits(hf, ids)) < 1e-4
    assert (ours.config.moe is None) == (overrides.get("num_experts") == 0)
    # decoding with our cache follows the same greedy path as transformers' generate
    prompt = ids[:1, :6]
    hf_out = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=6), hf_out)


def test_attention_layers_become_dsa_with_equal_logits_while_topk_covers_the_sequence(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "dsa", index_n_heads=2, index_head_dim=16, index_topk=32)
    ours = hybrid_lm.load_model(tmp_path / "dsa").eval()
    assert ours.config.layer_types == ["gated_deltanet"] * 3 + ["dsa"] and ours.config.moe is not None
    ids = torch.randint(0, V, (2, 19))
    assert rel_err(logits(ours, ids), logits(hf, ids)) < 1e-4


def test_config_maps_every_setting():
    cfg = qwen3_next_config_to_ours({**TINY, "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"],
                                     "router_aux_loss_coef": 0.002, "layer_types": None})
    assert cfg.layer_types == ["gated_deltanet"] * 3 + ["attention"]  # full_attention_interval 4 by default
    gdn = cfg.mixers["gated_deltanet"]
    assert gdn.resolved(cfg) == (2, 4, 8, 8) and gdn.norm_eps == 1e-6 and gdn.conv_size == 4
    att = cfg.mixers["attention"]
    assert att.qk_norm and att.output_gate and att.partial_rotary_factor == 0.5 and cfg.rope_theta == 5000.0
    moe = cfg.moe
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (6, 2, 16)
    assert moe.shared_expert_gate and moe.shared_expert_intermediate_size == 24 and moe.first_k_dense_replace == 1
    assert moe.aux_loss_coef == pytest.approx(0.004)  # transformers' loss is top-k times ours


def test_unsupported_layouts_are_refused_naming_the_key():
    base = {**TINY, "model_type": "qwen3_next"}
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        qwen3_next_config_to_ours({**base, "decoder_sparse_step": 2, "mlp_only_layers": []})
    with pytest.raises(ValueError, match="mlp_only_layers"):
        qwen3_next_config_to_ours({**base, "mlp_only_layers": [2]})
    with pytest.raises(ValueError, match="rope_type"):
        qwen3_next_config_to_ours({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        qwen3_next_config_to_ours({**base, "attention_bias": True})


def test_converts_back_to_the_same_tensors(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0"}')
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--dsa-layers", "none"]) == 0
    assert cli_main(["export-qwen3-next", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    source, back = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" /
                                                                                        "model.safetensors"))
    assert source.keys() == back.keys() and (tmp_path / "back" / "tokenizer.json").is_file()
    for key, tensor in source.items():
        if key.endswith(ZERO_CENTRED):
            # stored as 1 + w, which fp32 rounds; transformers only ever uses 1 + w, and that comes back exactly
            assert torch.equal(1.0 + back[key], 1.0 + tensor), key
            assert (back[key] - tensor).abs().max() <= 2 ** -23, key
        else:
            assert torch.equal(back[key], tensor), key
    reloaded = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    ids = torch.randint(0, V, (2, 13))
    torch.testing.assert_close(logits(reloaded.eval(), ids), logits(hf, ids), rtol=0, atol=0)


def test_bf16_checkpoint_converts_exactly_to_fp32(tmp_path):
    hf = hf_model().to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "ours", dsa_layers="none")
    ours = hybrid_lm.load_model(tmp_path / "ours")
    assert ours.embed_tokens.weight.dtype == torch.float32  # bf16 cannot hold 1 + w; fp32 holds it exactly
    export_qwen3_next(tmp_path / "ours", tmp_path / "back")
    source, back = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" /
                                                                                        "model.safetensors"))
    assert all(torch.equal(back[k].to(torch.bfloat16), t) for k, t in source.items())


def test_zoo_replica_runs_inside_transformers(tmp_path):
    cfg = hybrid_lm.load_config(os.path.join(ROOT, "model_configs", "qwen3-next-tiny.yaml"))
    ours = hybrid_lm.build_model(hybrid_lm.config_replace(cfg, vocab_size=V)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    hybrid_lm.save_model(ours, tmp_path / "ours")
    export_qwen3_next(tmp_path / "ours", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["layer_types"][:4] == \
        ["linear_attention"] * 3 + ["full_attention"]
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, V, (2, 17))
    assert rel_err(logits(hf, ids), logits(ours, ids)) < 1e-4


def test_export_refuses_what_qwen3_next_cannot_express(tmp_path):
    from tests.model.helpers import tiny_model

    hybrid_lm.save_model(tiny_model(["gated_deltanet", "dsa"]), tmp_path / "dsa")
    with pytest.raises(ValueError, match="Qwen3-Next has only"):
        export_qwen3_next(tmp_path / "dsa", tmp_path / "out")
    sigmoid = tiny_model(["gated_deltanet", "attention"], moe={"num_experts": 4, "scoring_func": "sigmoid",
                                                               "num_shared_experts": 1, "shared_expert_gate": True},
                         mixers={"gated_deltanet": {"norm_eps": 1e-6}})
    hybrid_lm.save_model(sigmoid, tmp_path / "sigmoid")
    with pytest.raises(ValueError, match="routes by softmax"):
        export_qwen3_next(tmp_path / "sigmoid", tmp_path / "out")
    assert cli_main(["export-qwen3-next", str(tmp_path / "dsa"), str(tmp_path / "out")]) == 2
