"""DeepSeek-V3.2 (arXiv 2512.02556) weights both ways: a transformers `DeepseekV32ForCausalLM` folder becomes a
hybrid_lm model, and a hybrid_lm model whose config maps is written back in that format.

V3.2 is an all-DSA model: every layer is multi-head latent attention (`dsa` with `kv_lora_rank` set, DeepSeek's
interleaved RoPE) with a lightning indexer fed by the query latent (rotate-half RoPE on its first
`qk_rope_head_dim` dims), and a feed-forward that is dense for the first `first_k_dense_replace` layers and a
DeepSeekMoE (sigmoid scores, `e_score_correction_bias`, group-limited routing, routed scaling, shared experts)
after. Parameter names are DeepSeek's on both sides; the renames are `self_attn` <-> `mixer`, the indexer's
`wq_b` <-> `wq`, `shared_experts` <-> `shared_expert`, and per-expert `experts.{e}.{gate,up,down}_proj.weight`
(the checkpoint layout) <-> stacked `experts.gate_up_proj [E, 2I, C]` / `experts.down_proj [E, C, I]`.
transformers' folders without scaled RoPE convert exactly; YaRN-scaled ones (the released 671B model) and FP8
checkpoints are refused with a message.

`hybrid-lm convert V32_FOLDER OUT` reads such a folder (through `convert.py`); `export_deepseek_v32` writes one.
Weights keep their stored shapes: embeddings `[V, C]`, projections `[out, in]`, experts `[E, out, in]`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import ModelConfig, config_from_dict
from .layers import DSAConfig
from .model.io import load_model, resolve_model_dir

__all__ = ["DEEPSEEK_V32_MODEL_TYPE", "deepseek_v32_config_to_ours", "deepseek_v32_state_to_ours",
           "read_deepseek_v32", "ours_to_deepseek_v32_config", "ours_to_deepseek_v32_state", "export_deepseek_v32"]

DEEPSEEK_V32_MODEL_TYPE = "deepseek_v32"
# transformers' DeepseekV32Config defaults, for keys a config.json may leave out
_V32_DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 163840, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "index_topk": 2048,
    "index_head_dim": 128, "index_n_heads": 64, "mlp_bias": False, "first_k_dense_replace": 3,
}
_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# (checkpoint name, our name) pieces
_RENAMES = ((".self_attn.", ".mixer."), (".indexer.wq_b.", ".indexer.wq."),
            (".mlp.shared_experts.", ".mlp.shared_expert."))


def _refuse(where: str, key: str, value, why: str):
    raise ValueError(f"{where}: key '{key}' = {value!r}: {why}; hybrid-lm converts DeepSeek-V3.2 models whose "
                     f"forward pass it reproduces exactly")


# --------------------------------------------------------------------------------------------- V3.2 -> ours
def _v32_rope_theta(hf: dict, where: str) -> float:
    params = hf.get("rope_parameters") or {}
    for key, entry in (("rope_parameters", params), ("rope_scaling", hf.get("rope_scaling") or {})):
        kind = entry.get("rope_type", entry.get("type", "default"))
        if kind != "default":
            _refuse(where, f"{key}.rope_type", kind, "only unscaled RoPE is supported (YaRN would also change the "
                                                     "softmax scale by its mscale)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _v32_dense_layers(hf: dict, n: int, where: str) -> int:
    """How many leading layers keep the dense MLP (transformers' `mlp_layer_types`, else first_k_dense_replace)."""
    kinds = hf.get("mlp_layer_types")
    if kinds is None:
        return min(hf["first_k_dense_replace"], n)
    k = kinds.count("dense")
    if list(kinds) != ["dense"] * k + ["sparse"] * (n - k):
        _refuse(where, "mlp_layer_types", kinds, "MoE layers must follow every dense layer")
    return k


def _v32_check(hf: dict, where: str) -> None:
    archs = hf.get("architectures") or []
    if any(not a.endswith("ForCausalLM") for a in archs):
        _refuse(where, "architectures", archs, "only *ForCausalLM checkpoints can be converted")
    if hf["hidden_act"] not in ("silu", "swish"):
        _refuse(where, "hidden_act", hf["hidden_act"], "the MLP and experts are SwiGLU, so only silu is supported")
    if hf["mlp_bias"]:
        _refuse(where, "mlp_bias", True, "the MLP projections have no bias")
    if hf.get("quantization_config"):
        _refuse(where, "quantization_config", hf["quantization_config"].get("quant_method"),
                "a quantised (FP8) checkpoint; dequantise it to bf16 first")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        _refuse(where, "num_key_value_heads", hf["num_key_value_heads"], f"MLA expands one key/value per query "
                                                                         f"head, so it must equal {heads}")
    if not hf.get("q_lora_rank"):
        _refuse(where, "q_lora_rank", hf.get("q_lora_rank"), "V3.2's indexer reads the query latent")
    types = hf.get("layer_types")
    if types is not None and set(types) != {"indexed_attention"}:
        _refuse(where, "layer_types", sorted(set(types)), "every V3.2 layer is indexed_attention")


def deepseek_v32_config_to_ours(hf: dict, where: str = "config.json", name: str = "") -> ModelConfig:
    """Our ModelConfig (every layer `dsa` on an MLA core, MoE from `first_k_dense_replace`) for a transformers
    DeepSeek-V3.2 config.json dict. Refuses, naming the key, what the zoo cannot reproduce exactly."""
    if hf.get("model_type") != DEEPSEEK_V32_MODEL_TYPE:
        _refuse(where, "model_type", hf.get("model_type"), f"expected {DEEPSEEK_V32_MODEL_TYPE!r}")
    hf = {**_V32_DEFAULTS, **hf}
    _v32_check(hf, where)
    n, rope = hf["num_hidden_layers"], hf["qk_rope_head_dim"]
    dsa = {"q_lora_rank": hf["q_lora_rank"], "kv_lora_rank": hf["kv_lora_rank"], "qk_nope_head_dim":
           hf["qk_nope_head_dim"], "qk_rope_head_dim": rope, "v_head_dim": hf["v_head_dim"], "rope_interleave": True,
           "attention_bias": bool(hf["attention_bias"]), "index_n_heads": hf["index_n_heads"],
           "index_head_dim": hf["index_head_dim"], "index_topk": hf["index_topk"], "index_rope_dim": rope}
    data = {
        "name": name, "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"], "num_hidden_layers": n,
        "layer_types": ["dsa"] * n, "num_attention_heads": hf["num_attention_heads"],
        "num_key_value_heads": hf["num_attention_heads"], "head_dim": hf["qk_nope_head_dim"] + rope,
        "intermediate_size": hf["intermediate_size"], "max_position_embeddings": hf["max_position_embeddings"],
        "rope_theta": _v32_rope_theta(hf, where), "rms_norm_eps": float(hf["rms_norm_eps"]),
        "tie_word_embeddings": bool(hf["tie_word_embeddings"]), "initializer_range": float(hf["initializer_range"]),
        "mixers": {"dsa": dsa},
    }
    dense = _v32_dense_layers(hf, n, where)
    if dense < n:
        experts, groups = hf["n_routed_experts"], hf["n_group"]
        if experts % groups or experts // groups < 2:
            _refuse(where, "n_group", groups, f"DeepSeek scores a group by its two best experts, so each of the "
                                              f"groups needs >= 2 of the {experts} experts")
        if hf["n_shared_experts"] < 1:
            _refuse(where, "n_shared_experts", hf["n_shared_experts"], "V3.2's MoE has at least one shared expert")
        data["moe"] = {
            "num_experts": experts, "num_experts_per_tok": hf["num_experts_per_tok"],
            "moe_intermediate_size": hf["moe_intermediate_size"], "num_shared_experts": hf["n_shared_experts"],
            "shared_expert_intermediate_size": hf["moe_intermediate_size"] * hf["n_shared_experts"],
            "scoring_func": "sigmoid", "norm_topk_prob": bool(hf["norm_topk_prob"]),
            "routed_scaling_factor": float(hf["routed_scaling_factor"]), "n_group": groups,
            "topk_group": hf["topk_group"], "balancing": "bias", "first_k_dense_replace": dense,
        }
    return config_from_dict(data, where)


def _stack_experts(experts: dict[str, dict[int, dict[str, torch.Tensor]]], where: str) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors -> our stacked `gate_up_proj [E, 2I, C]` (gate rows first), `down_proj`."""
    out = {}
    for prefix, per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise ValueError(f"{where}: {prefix} has experts {sorted(per_expert)[:8]}..., expected 0..E-1")
        parts = [per_expert[e] for e in range(len(per_expert))]
        if any(set(p) != {"gate_proj", "up_proj", "down_proj"} for p in parts):
            raise ValueError(f"{where}: an expert of {prefix} lacks one of gate_proj/up_proj/down_proj")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([p["gate_proj"], p["up_proj"]]) for p in parts])
        out[f"{prefix}.down_proj"] = torch.stack([p["down_proj"] for p in parts])
    return out


def deepseek_v32_state_to_ours(state: dict[str, torch.Tensor], num_layers: int,
                               where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename a V3.2 state dict (per-expert or stacked experts) to ours; drops the multi-token-prediction layers
    (index >= num_layers, unused by the causal LM) and zero o_proj biases; refuses FP8 scales."""
    out, experts, unknown = {}, {}, []
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key.endswith("weight_scale_inv"):
            raise ValueError(f"{where}: tensor {key!r} is an FP8 scale; dequantise the checkpoint to bf16 first")
        name = key[len("model."):] if key.startswith("model.") else key
        match = re.match(r"^layers\.(\d+)\.", name)
        if match and int(match.group(1)) >= num_layers:
            continue
        for old, new in _RENAMES:
            name = name.replace(old, new)
        if name.endswith("mixer.o_proj.bias"):  # our o_proj has no bias; a zero one changes nothing
            if tensor.count_nonzero():
                raise ValueError(f"{where}: tensor {key!r} is a non-zero o_proj bias, which hybrid_lm's attention "
                                 f"does not have; this model cannot be converted exactly")
            continue
        expert = _EXPERT.match(name)
        if expert:
            experts.setdefault(expert.group(1), {}).setdefault(int(expert.group(2)), {})[expert.group(3)] = tensor
            continue
        if not (name.startswith(("layers.", "embed_tokens.", "norm.")) or name == "lm_head.weight"):
            unknown.append(key)
        out[name] = tensor
    if unknown:
        raise ValueError(f"{where}: unexpected tensors {unknown[:5]} for a DeepseekV32ForCausalLM checkpoint")
    out.update(_stack_experts(experts, where))
    return out


def read_deepseek_v32(hf: dict, state: dict[str, torch.Tensor], where: str = "config.json",
                      name: str = "") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our config and state dict for a transformers DeepSeek-V3.2 config.json dict and its raw tensors."""
    config = deepseek_v32_config_to_ours(hf, where, name=name)
    return config, deepseek_v32_state_to_ours(state, config.num_hidden_layers, where)


# --------------------------------------------------------------------------------------------- ours -> V3.2
def _v32_attention(cfg: ModelConfig, where: str) -> DSAConfig:
    """The one DSA-on-MLA setting every layer must share for the model to be a DeepSeek-V3.2."""
    sections = [cfg.mixer_config(t) for t in cfg.layer_types if cfg.mixer_type(t) == "dsa"]
    if any(cfg.mixer_type(t) != "dsa" for t in cfg.layer_types) or len({repr(s) for s in sections}) != 1:
        raise ValueError(f"{where}: layer_types {sorted(set(cfg.layer_types))}: a DeepSeek-V3.2 has one kind of "
                         f"layer, `dsa` with the same settings everywhere")
    dsa = sections[0]
    wants = {"kv_lora_rank": dsa.kv_lora_rank is not None, "q_lora_rank": dsa.q_lora_rank is not None,
             "rope_interleave": dsa.rope_interleave, "qk_norm": not dsa.qk_norm, "output_gate": not dsa.output_gate,
             "partial_rotary_factor": dsa.partial_rotary_factor == 1.0,
             "index_rope_dim": dsa.rope_dim == dsa.qk_rope_head_dim}
    for key, ok in wants.items():
        if not ok:
            raise ValueError(f"{where}: mixers.dsa.{key} = {getattr(dsa, key, dsa.rope_dim)!r} has no DeepSeek-V3.2 "
                             f"equivalent (V3.2: MLA with a query latent, interleaved RoPE, no qk_norm / output "
                             f"gate, indexer RoPE over qk_rope_head_dim dims)")
    return dsa


def _v32_moe(cfg: ModelConfig, where: str) -> dict:
    moe = cfg.moe
    if moe is None:  # every layer dense
        return {"first_k_dense_replace": cfg.num_hidden_layers}
    checks = {"scoring_func": moe.scoring_func == "sigmoid", "shared_expert_gate": not moe.shared_expert_gate,
              "num_shared_experts": moe.num_shared_experts >= 1,
              "shared_expert_intermediate_size": moe.shared_expert_intermediate_size ==
              moe.moe_intermediate_size * moe.num_shared_experts,
              "n_group": moe.num_experts // moe.n_group >= 2}
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"{where}: moe.{key} = {getattr(moe, key)!r} has no DeepSeek-V3.2 equivalent (V3.2: "
                             f"sigmoid scores, >= 1 ungated shared expert of moe_intermediate_size x "
                             f"num_shared_experts, >= 2 experts per group)")
    return {"n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.num_experts_per_tok,
            "moe_intermediate_size": moe.moe_intermediate_size, "n_shared_experts": moe.num_shared_experts,
            "norm_topk_prob": moe.norm_topk_prob, "routed_scaling_factor": moe.routed_scaling_factor,
            "n_group": moe.n_group, "topk_group": moe.topk_group, "first_k_dense_replace": moe.first_k_dense_replace}


def ours_to_deepseek_v32_config(cfg: ModelConfig, where: str = "model config") -> dict:
    """A transformers DeepSeek-V3.2 config.json dict for our config; ValueError (naming the key) if it does not map."""
    dsa, moe = _v32_attention(cfg, where), _v32_moe(cfg, where)
    n, dense = cfg.num_hidden_layers, moe["first_k_dense_replace"]
    return {
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": DEEPSEEK_V32_MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": n, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads, "q_lora_rank": dsa.q_lora_rank,
        "kv_lora_rank": dsa.kv_lora_rank, "qk_nope_head_dim": dsa.qk_nope_head_dim,
        "qk_rope_head_dim": dsa.qk_rope_head_dim, "v_head_dim": dsa.v_head_dim, "attention_bias": dsa.attention_bias,
        "index_n_heads": dsa.index_n_heads, "index_head_dim": dsa.index_head_dim, "index_topk": dsa.index_topk,
        **moe, "mlp_layer_types": ["dense"] * dense + ["sparse"] * (n - dense), "hidden_act": "silu",
        "mlp_bias": False, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": cfg.initializer_range,
    }


def ours_to_deepseek_v32_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict in the V3.2 checkpoint layout (per-expert tensors, `model.` prefix, o_proj biases of zero
    where attention_bias asks for them; a tied head is stored once, as the embedding)."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[name] = tensor
            continue
        for new, old in _RENAMES:
            name = name.replace(old, new)
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                out[f"model.{prefix}{e}.gate_proj.weight"], out[f"model.{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e, down in enumerate(tensor):
                out[f"model.{prefix}{e}.down_proj.weight"] = down
        else:
            out[f"model.{name}"] = tensor
    for i, layer_type in enumerate(cfg.layer_types):
        if cfg.is_moe_layer(i) and f"model.layers.{i}.mlp.gate.e_score_correction_bias" not in out:
            # balancing without a selection bias: V3.2 always has one, and a zero bias selects the same experts
            out[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = torch.zeros(cfg.moe.num_experts)
        if cfg.mixer_config(layer_type).attention_bias:
            out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.hidden_size,
                                                                         dtype=out["model.norm.weight"].dtype)
    return {k: v.contiguous() for k, v in out.items()}


def export_deepseek_v32(src: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                        force: bool = False) -> Path:
    """Write the model at `src` (run, checkpoint or saved-model folder) as a transformers DeepSeek-V3.2 folder
    (config.json, model.safetensors, tokenizer files), loadable by `DeepseekV32ForCausalLM.from_pretrained`.
    `dtype` None keeps the checkpoint's; `force` replaces a non-empty `out`."""
    from .convert import _check_out, write_hf_folder  # convert imports this module lazily

    out = Path(out)
    model_dir = resolve_model_dir(src)
    _check_out(model_dir, out, force)  # a folder, empty unless force, and never the source or a folder holding it
    model = load_model(model_dir, dtype=dtype)
    hf = ours_to_deepseek_v32_config(model.config, str(model_dir / "config.yaml"))
    state = ours_to_deepseek_v32_state(model.state_dict(), model.config)
    hf["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    # written whole beside OUT, then renamed in: a failure leaves an earlier export in OUT as it was
    write_hf_folder(out, force, state, hf, [model_dir])
    return out
