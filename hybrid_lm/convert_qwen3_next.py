"""Qwen3-Next (Qwen team 2025; transformers' `Qwen3NextForCausalLM`) weights, both ways.

Qwen3-Next is a hybrid of Gated DeltaNet (`linear_attention`) and gated attention (`full_attention`) layers with a
mixture-of-experts feed-forward and a sigmoid-gated shared expert: in the zoo, `gated_deltanet` + `attention`
(`qk_norm`, `output_gate`, `partial_rotary_factor`) + `moe`. What differs in the checkpoint:

- its RMSNorms are zero-centred (`x_hat * (1 + w)`): ours store `1 + w`. That holds for every decoder norm,
  the final norm and q_norm/k_norm, not for the GDN output norm (`x_hat * w * silu(z)`), which is copied;
- a GDN layer fuses q|k|v|z into `in_proj_qkvz` and b|a into `in_proj_ba`, laid out per key head: rows
  `[H, (Dk q, Dk k, r*Dv v, r*Dv z)]` and `[H, (r b, r a)]` with r = HV / H value heads per key head, value head
  `h * r + j` belonging to key head h (the grouping our `repeat_interleave` uses);
- one depthwise `conv1d` runs over the concatenated q|k|v channels, ours has one per stream.

Reading (`hybrid-lm convert QWEN3_NEXT_DIR OUT`) goes through `hybrid_lm.convert`, which hands `qwen3_next` folders
here. A bf16 checkpoint becomes an fp32 model: bf16 cannot hold `1 + w` exactly, fp32 can. `export_qwen3_next`
(`hybrid-lm export-qwen3-next RUN OUT`) writes a model of ours whose config maps back as a transformers folder.
Shapes: projections `[out, in]`, C hidden size, H key heads, HV value heads, Dk / Dv head dims.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig, config_from_dict
from .model.io import load_model, resolve_model_dir
from .utils.typed import to_dict

__all__ = ["qwen3_next_config_to_ours", "qwen3_next_state_to_ours", "ours_config_to_qwen3_next",
           "ours_state_to_qwen3_next", "export_qwen3_next"]

_LAYER_TYPES = {"linear_attention": "gated_deltanet", "full_attention": "attention"}
_ZERO_CENTRED = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight")


def _refuse(where: str, key: str, value, why: str):
    raise ValueError(f"{where}: key '{key}' = {value!r}: {why}; hybrid-lm converts Qwen3-Next models whose forward "
                     f"pass it reproduces exactly")


# --------------------------------------------------------------------------------------------- Qwen3-Next -> ours
def _rope(hf: dict, where: str) -> tuple[float, float]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        _refuse(where, "rope_parameters.rope_type", kind, "only the default RoPE (no scaling) is supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25)))


def _moe_section(hf: dict, n: int, where: str) -> dict | None:
    """Our `moe` settings; Qwen3-Next's dense layers must be a prefix (`mlp_only_layers` = 0..k-1)."""
    if not hf.get("num_experts"):
        return None
    step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(n) if i in only or (i + 1) % step]
    if dense == list(range(n)):
        return None
    if dense != list(range(len(dense))):
        _refuse(where, "mlp_only_layers / decoder_sparse_step", (sorted(only), step),
                f"dense layers {dense} must come first (the zoo's MoE starts at first_k_dense_replace)")
    shared = hf.get("shared_expert_intermediate_size", 0)
    if not shared:
        _refuse(where, "shared_expert_intermediate_size", shared, "expected a shared expert")
    k = hf["num_experts_per_tok"]
    return {"num_experts": hf["num_experts"], "num_experts_per_tok": k,
            "moe_intermediate_size": hf["moe_intermediate_size"], "num_shared_experts": 1,
            "shared_expert_intermediate_size": shared, "shared_expert_gate": True, "scoring_func": "softmax",
            "norm_topk_prob": bool(hf.get("norm_topk_prob", True)), "balancing": "aux_loss",
            # transformers' loss is K times ours (moe_aux_loss), so the same pressure needs K times the coef
            "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)) * k, "first_k_dense_replace": len(dense)}


def qwen3_next_config_to_ours(hf: dict, where: str = "config.json", name: str = "") -> ModelConfig:
    """Our ModelConfig for a Qwen3-Next config.json dict; refuses, naming the key, what it cannot reproduce."""
    if hf.get("model_type") != "qwen3_next":
        _refuse(where, "model_type", hf.get("model_type"), "expected 'qwen3_next'")
    if any(not a.endswith("ForCausalLM") for a in hf.get("architectures") or []):
        _refuse(where, "architectures", hf["architectures"], "only *ForCausalLM checkpoints can be converted")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        _refuse(where, "hidden_act", hf["hidden_act"], "the MLPs and GDN convolutions use silu")
    if hf.get("attention_bias"):
        _refuse(where, "attention_bias", True, "the attention projections have no bias")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["full_attention" if (i + 1) % hf.get("full_attention_interval", 4) == 0
                                      else "linear_attention" for i in range(n)]
    if set(types) - set(_LAYER_TYPES):
        _refuse(where, "layer_types", sorted(set(types) - set(_LAYER_TYPES)), "unknown Qwen3-Next layer type")
    theta, partial = _rope(hf, where)
    eps = float(hf.get("rms_norm_eps", 1e-6))
    heads = hf["num_attention_heads"]
    data = {
        "name": name, "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"], "num_hidden_layers": n,
        "layer_types": [_LAYER_TYPES[t] for t in types], "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads, "intermediate_size": hf["intermediate_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", 32768), "rope_theta": theta,
        "rms_norm_eps": eps, "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "initializer_range": float(hf.get("initializer_range", 0.02)),
        "mixers": {
            "attention": {"qk_norm": True, "output_gate": True, "partial_rotary_factor": partial},
            "gated_deltanet": {"num_heads": hf["linear_num_key_heads"], "num_v_heads": hf["linear_num_value_heads"],
                               "head_k_dim": hf["linear_key_head_dim"], "head_v_dim": hf["linear_value_head_dim"],
                               "conv_size": hf.get("linear_conv_kernel_dim", 4), "norm_eps": eps},
        },
        "moe": _moe_section(hf, n, where),
    }
    data["mixers"] = {k: v for k, v in data["mixers"].items() if k in data["layer_types"]}
    return config_from_dict(data, where)


def _gdn_dims(cfg: ModelConfig) -> tuple[int, int, int, int]:
    return cfg.mixer_config("gated_deltanet").resolved(cfg)


def _split_gdn(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One fused Qwen3-Next GDN tensor -> our per-stream tensors (names relative to the mixer)."""
    H, HV, K, V = _gdn_dims(cfg)
    r, C = HV // H, tensor.shape[-1]
    if name == "in_proj_qkvz.weight":
        q, k, v, z = tensor.view(H, 2 * K + 2 * r * V, C).split([K, K, r * V, r * V], dim=1)  # [H, *, C] each
        return {"q_proj.weight": q.reshape(H * K, C), "k_proj.weight": k.reshape(H * K, C),
                "v_proj.weight": v.reshape(HV * V, C), "g_proj.weight": z.reshape(HV * V, C)}
    if name == "in_proj_ba.weight":
        b, a = tensor.view(H, 2 * r, C).split([r, r], dim=1)  # [H, r, C] each
        return {"b_proj.weight": b.reshape(HV, C), "a_proj.weight": a.reshape(HV, C)}
    q, k, v = tensor.split([H * K, H * K, HV * V], dim=0)  # conv1d.weight [2HK + HV V, 1, W]
    return {"q_conv1d.weight": q, "k_conv1d.weight": k, "v_conv1d.weight": v}


_GDN_RENAMES = {"A_log": "A_log", "dt_bias": "dt_bias", "norm.weight": "o_norm.weight",
                "out_proj.weight": "o_proj.weight"}


def _plus_one(t: torch.Tensor) -> torch.Tensor:
    return t.float() + 1.0 if t.dtype in (torch.bfloat16, torch.float16) else t + 1.0


def qwen3_next_state_to_ours(state: dict[str, torch.Tensor], cfg: ModelConfig,
                             where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename, split and re-centre a Qwen3-Next state dict into ours; `mtp.*` (multi-token prediction) is dropped."""
    out, unknown = {}, []
    for key, t in state.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if name.startswith("mtp.") or name.endswith("rotary_emb.inv_freq"):
            continue
        if name in ("embed_tokens.weight", "lm_head.weight"):
            out[name] = t
        elif name == "norm.weight":
            out[name] = _plus_one(t)
        elif name.startswith("layers.") and name.split(".")[2] in ("linear_attn", "self_attn"):
            i, block, rest = name.split(".", 3)[1:]
            prefix = f"layers.{i}.mixer."
            if block == "self_attn":
                out[prefix + rest] = _plus_one(t) if rest in _ZERO_CENTRED else t
            elif rest in ("in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight"):
                out.update({prefix + k: v.clone() for k, v in _split_gdn(rest, t, cfg).items()})  # own storage
            elif rest in _GDN_RENAMES:
                out[prefix + _GDN_RENAMES[rest]] = t
            else:
                unknown.append(key)
        elif name.startswith("layers.") and name.split(".", 2)[2] in _ZERO_CENTRED:
            out[name] = _plus_one(t)
        elif name.startswith("layers.") and name.split(".")[2] == "mlp":
            out[name] = t  # dense SwiGLU, router, shared expert and stacked experts already use our names
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{where}: unexpected tensors {unknown[:5]} for a Qwen3NextForCausalLM checkpoint")
    return _stack_experts(out, cfg, where)


def _stack_experts(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` (the Qwen checkpoint layout, which transformers also
    writes) -> our stacked `experts.gate_up_proj [E, 2I, C]` and `experts.down_proj [E, C, I]`."""
    E = cfg.moe.num_experts if cfg.moe else 0
    for i in range(cfg.num_hidden_layers):
        prefix = f"layers.{i}.mlp.experts."
        per_expert = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix) and k[len(prefix)].isdigit()]}
        if not per_expert:
            continue
        try:
            experts = [[per_expert.pop(f"{prefix}{e}.{p}_proj.weight") for p in ("gate", "up", "down")]
                       for e in range(E)]
        except KeyError as e:
            raise ValueError(f"{where}: expert tensor {e} is missing for a model of {E} experts") from None
        if per_expert:
            raise ValueError(f"{where}: unexpected expert tensors {sorted(per_expert)[:5]} ({E} experts expected)")
        state[prefix + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u, _ in experts])  # [E, 2I, C]
        state[prefix + "down_proj"] = torch.stack([d for _, _, d in experts])  # [E, C, I]
    return state


def read_qwen3_next(hf: dict, state: dict[str, torch.Tensor], where: str,
                    name: str = "") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and state dict of ours for a parsed config.json and its weights (used by `hybrid_lm.convert`)."""
    cfg = qwen3_next_config_to_ours(hf, where, name)
    return cfg, qwen3_next_state_to_ours(state, cfg, where)


# --------------------------------------------------------------------------------------------- ours -> Qwen3-Next
def _only_settings(cfg: ModelConfig, kind: str) -> dict | None:
    """The one settings dict shared by every layer of mixer `kind` (backends aside), or None if it has none."""
    found = {repr(sorted((k, v) for k, v in to_dict(cfg.mixer_config(t)).items() if k != "backend"))
             for t in cfg.layer_types if cfg.mixer_type(t) == kind}
    if len(found) > 1:
        raise ValueError(f"{kind} layers with different settings cannot be one Qwen3-Next config")
    t = next((t for t in cfg.layer_types if cfg.mixer_type(t) == kind), None)
    return None if t is None else to_dict(cfg.mixer_config(t))


def _check_maps(cfg: ModelConfig) -> None:
    kinds = {cfg.mixer_type(t) for t in cfg.layer_types}
    if kinds - {"gated_deltanet", "attention"}:
        raise ValueError(f"layer types {sorted(kinds - {'gated_deltanet', 'attention'})}: Qwen3-Next has only "
                         f"Gated DeltaNet and attention layers")
    att, gdn = _only_settings(cfg, "attention"), _only_settings(cfg, "gated_deltanet")
    if att and not (att["qk_norm"] and att["output_gate"] and not att["attention_bias"]
                    and att["sliding_window"] is None):
        raise ValueError(f"attention settings {att}: Qwen3-Next attention has qk_norm and output_gate, no bias and "
                         f"no sliding window")
    if gdn and (gdn["allow_neg_eigval"] or gdn["norm_eps"] != cfg.rms_norm_eps):
        raise ValueError(f"gated_deltanet settings {gdn}: Qwen3-Next needs allow_neg_eigval false and norm_eps = "
                         f"rms_norm_eps = {cfg.rms_norm_eps}")
    moe = cfg.moe
    if moe is not None and (moe.scoring_func != "softmax" or moe.n_group != 1 or moe.routed_scaling_factor != 1.0
                            or moe.num_shared_experts < 1 or not moe.shared_expert_gate):
        raise ValueError(f"moe settings {to_dict(moe)}: Qwen3-Next routes by softmax without groups or scaling and "
                         f"has one gated shared expert")


def ours_config_to_qwen3_next(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A transformers `Qwen3NextConfig` dict for our config; ValueError when the architecture does not map."""
    _check_maps(cfg)
    att, gdn = _only_settings(cfg, "attention") or {}, _only_settings(cfg, "gated_deltanet")
    H, HV, K, V = _gdn_dims(cfg) if gdn else (1, 1, cfg.head_dim, cfg.head_dim)
    moe = cfg.moe
    return {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "dtype": str(dtype).split(".")[-1],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "layer_types": ["linear_attention" if cfg.mixer_type(t) == "gated_deltanet" else "full_attention"
                        for t in cfg.layer_types],
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": att.get("partial_rotary_factor", 0.25)},
        "linear_num_key_heads": H, "linear_num_value_heads": HV, "linear_key_head_dim": K, "linear_value_head_dim": V,
        "linear_conv_kernel_dim": gdn["conv_size"] if gdn else 4,
        "num_experts": moe.num_experts if moe else 0, "num_experts_per_tok": moe.num_experts_per_tok if moe else 1,
        "moe_intermediate_size": moe.moe_intermediate_size if moe else cfg.intermediate_size,
        "shared_expert_intermediate_size": moe.shared_expert_intermediate_size if moe else cfg.intermediate_size,
        "norm_topk_prob": moe.norm_topk_prob if moe else True, "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(moe.first_k_dense_replace)) if moe else [],
        "router_aux_loss_coef": moe.aux_loss_coef / moe.num_experts_per_tok if moe else 0.001,
    }


def ours_state_to_qwen3_next(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in Qwen3-Next names and layouts (the inverse of `qwen3_next_state_to_ours`)."""
    _check_maps(cfg)
    out = {"model.embed_tokens.weight": state["embed_tokens.weight"], "model.norm.weight": state["norm.weight"] - 1}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i, layer_type in enumerate(cfg.layer_types):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[dst + norm] = state[src + norm] - 1
        mixer = {k[len(src + "mixer."):]: v for k, v in state.items() if k.startswith(src + "mixer.")}
        if cfg.mixer_type(layer_type) == "attention":
            out.update({f"{dst}self_attn.{k}": v - 1 if k in _ZERO_CENTRED else v for k, v in mixer.items()})
        else:
            out.update({f"{dst}linear_attn.{k}": v for k, v in _fuse_gdn(mixer, cfg).items()})
        for k, v in state.items():
            if k.startswith(src + "mlp."):
                if k.endswith("e_score_correction_bias"):
                    if v.count_nonzero():
                        raise ValueError(f"{k} is non-zero: Qwen3-Next has no expert-selection bias")
                    continue
                out[dst + k[len(src):]] = v
    return {k: v.contiguous() for k, v in _unstack_experts(out).items()}


def _unstack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked expert tensors -> the per-expert keys of Qwen's checkpoints (the inverse of `_stack_experts`)."""
    out = {}
    for k, v in state.items():
        prefix = k.rsplit(".", 1)[0] + "."
        if k.endswith("mlp.experts.gate_up_proj"):
            gates, ups = v.chunk(2, dim=1)  # [E, I, C] each
            for e, (gate, up) in enumerate(zip(gates.unbind(0), ups.unbind(0))):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif k.endswith("mlp.experts.down_proj"):
            for e, down in enumerate(v.unbind(0)):
                out[f"{prefix}{e}.down_proj.weight"] = down
        else:
            out[k] = v
    return out


def _fuse_gdn(m: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    H, HV, K, V = _gdn_dims(cfg)
    r, C = HV // H, m["q_proj.weight"].shape[-1]
    qkvz = [m["q_proj.weight"].view(H, K, C), m["k_proj.weight"].view(H, K, C),
            m["v_proj.weight"].view(H, r * V, C), m["g_proj.weight"].view(H, r * V, C)]
    ba = [m["b_proj.weight"].view(H, r, C), m["a_proj.weight"].view(H, r, C)]
    return {"in_proj_qkvz.weight": torch.cat(qkvz, dim=1).reshape(-1, C),  # [H * (2K + 2rV), C]
            "in_proj_ba.weight": torch.cat(ba, dim=1).reshape(-1, C),  # [2 HV, C]
            "conv1d.weight": torch.cat([m["q_conv1d.weight"], m["k_conv1d.weight"], m["v_conv1d.weight"]]),
            **{hf: m[ours] for hf, ours in _GDN_RENAMES.items()}}


def export_qwen3_next(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write our model at `src` (run, checkpoint or saved model) as a transformers Qwen3-Next folder at `out`."""
    from .convert import _check_out, write_hf_folder  # convert imports this module lazily

    src, out = Path(src), Path(out)
    _check_out(src, out, force)
    model = load_model(src)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    hf_config = ours_config_to_qwen3_next(model.config, model.embed_tokens.weight.dtype)
    hf_state = ours_state_to_qwen3_next(model.config, state)
    write_hf_folder(out, force, hf_state, hf_config, [resolve_model_dir(src), src])
    return out
