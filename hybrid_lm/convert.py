"""`hybrid-lm convert`: turn a dense checkpoint into a DeepSeek Sparse Attention model.

DeepSeek-V3.2 (arXiv 2512.02556, section 2) adds DSA to an already-trained dense model by continued training:
a dense warm-up that trains only the new lightning indexers, then sparse training of the whole model. This module
makes the starting point. The source is a model of ours (run, checkpoint or saved-model folder) or a Hugging Face
Llama / Qwen2 / Qwen3 folder (`config.json` + safetensors or `pytorch_model.bin`, read without transformers).
Chosen attention layers become `dsa` layers: attention weights copied bit-exactly, indexers freshly initialised
(seeded). While `index_topk` >= the sequence length the converted model's logits equal the source's. Continue
with a training YAML that sets `init_from: OUT` and `dsa_stage: dense_warmup`, then `dsa_stage: sparse`.

Weights keep their stored shapes: embeddings `[V, C]`, projections `[out, in]`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig, config_from_dict, config_to_dict
from .layers import AttentionConfig, DSAConfig
from .model.io import CONFIG_NAME, build_model, load_model, resolve_model_dir, save_model
from .model.model import HybridLM
from .utils.files import fsync_dir, fsync_tree, read_json, write_manifest
from .utils.typed import to_dict

__all__ = ["convert_checkpoint", "parse_dsa_layers", "describe_conversion", "hf_config_to_ours",
           "HF_MODEL_TYPES", "TOKENIZER_FILES", "PROVENANCE_NAME"]

HF_MODEL_TYPES = ("llama", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
PROVENANCE_NAME = "convert.json"


@dataclass
class _Source:
    config: ModelConfig
    state: dict[str, torch.Tensor]
    folders: list[Path]  # where tokenizer files are looked for, in order
    kind: str
    num_parameters: int


# --------------------------------------------------------------------------------------------- public API
def convert_checkpoint(src: str | Path, out: str | Path, dsa_layers: str | list[int] = "all", index_n_heads: int = 4,
                       index_head_dim: int = 64, index_topk: int = 2048, seed: int = 0, force: bool = False) -> Path:
    """Write a copy of `src` whose chosen attention layers are DSA layers to `out`; returns `out`.

    `dsa_layers`: "all" (every attention layer without a sliding window), "none" (a plain import/copy), a list
    of layer indices, or the same as text ("0,3,5"). `force` replaces a non-empty `out`.
    """
    spec = parse_dsa_layers(dsa_layers)
    out = Path(out)
    _check_out(Path(src), out, force)
    source = _read_source(Path(src))
    where = f"convert {src}"
    config, converted = _target_config(source.config, spec, index_n_heads, index_head_dim, index_topk, where)
    model = _build_converted(config, source.state, converted, seed, where)
    provenance = {
        "source": str(Path(src).resolve()), "source_kind": source.kind, "dsa_layers": converted,
        "layer_types": config.layer_types, "index_n_heads": index_n_heads, "index_head_dim": index_head_dim,
        "index_topk": index_topk, "seed": seed, "parameters_before": source.num_parameters,
        "parameters_after": model.num_parameters(), "dtype": str(model.embed_tokens.weight.dtype).split(".")[-1],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return _write(model, out, force, source.folders, provenance)


def parse_dsa_layers(spec: str | list[int] | tuple[int, ...]) -> str | list[int]:
    """The layer choice as "all", "none" or a list of indices, from CLI text ("all", "none", "0,3,5") or a list."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("all", "none"):
            return text
        try:
            layers = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            layers = []
        if not layers:
            raise ValueError(f"--dsa-layers {spec!r}: give 'all', 'none' or comma-separated layer indices "
                             f"such as 0,3,5")
        return layers
    if isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        return list(spec)
    raise ValueError(f"dsa_layers = {spec!r}: give 'all', 'none' or a list of layer indices")


def describe_conversion(out: str | Path) -> str:
    """A few lines saying what `convert_checkpoint` wrote to `out` (read from its convert.json)."""
    info = json.loads((Path(out) / PROVENANCE_NAME).read_text())
    layers = info["dsa_layers"]
    what = (f"converted layers {layers} to DSA (indexer: {info['index_n_heads']} heads x {info['index_head_dim']} "
            f"dims, top-{info['index_topk']}, seed {info['seed']})" if layers else "no layer converted (plain import)")
    return "\n".join([
        f"source: {info['source']} ({info['source_kind']})",
        what,
        f"layer_types: {info['layer_types']}",
        f"parameters: {info['parameters_before']:,} -> {info['parameters_after']:,} ({info['dtype']})",
        f"wrote {Path(out).resolve()}",
    ])


# --------------------------------------------------------------------------------------------- reading sources
def _read_source(path: Path) -> _Source:
    if not path.exists():
        raise ValueError(f"source {str(path)!r} does not exist: pass a run folder, checkpoint folder or saved model "
                         f"of hybrid_lm, or a Hugging Face model folder with config.json")
    if path.is_dir() and (path / "config.json").is_file() and not (path / CONFIG_NAME).is_file():
        return _read_hf(path)
    model = load_model(path)
    folder = resolve_model_dir(path)
    return _Source(model.config, model.state_dict(), [folder, path], "hybrid_lm", model.num_parameters())


def _read_hf(folder: Path) -> _Source:
    where = str(folder / "config.json")
    hf = read_json(folder / "config.json")
    if isinstance(hf, dict) and hf.get("model_type") == "qwen3_next":  # hybrid GDN + attention + MoE
        from .convert_qwen3_next import read_qwen3_next

        config, state = read_qwen3_next(hf, _load_hf_weights(folder), where, name=folder.resolve().name)
    elif isinstance(hf, dict) and hf.get("model_type") == "deepseek_v32":  # MLA + DSA + MoE
        from .convert_deepseek_v32 import read_deepseek_v32

        config, state = read_deepseek_v32(hf, _load_hf_weights(folder), where, name=folder.resolve().name)
    else:
        config = hf_config_to_ours(hf, where, name=folder.resolve().name)
        state = _hf_state_dict(_load_hf_weights(folder), hf["model_type"], folder)
    unique = {t.data_ptr(): t.numel() for t in state.values()}
    return _Source(config, state, [folder], f"huggingface/{hf['model_type']}", sum(unique.values()))


def _refuse(where: str, key: str, value, why: str):
    raise ValueError(f"{where}: key '{key}' = {value!r}: {why}; hybrid-lm convert supports Hugging Face "
                     f"{'/'.join(HF_MODEL_TYPES)} models whose forward pass it reproduces exactly")


def _hf_rope(hf: dict, where: str) -> tuple[float, float]:
    """rope_theta and partial_rotary_factor, from transformers 5's `rope_parameters` or the older flat keys."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for key, entry in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = entry.get("rope_type", entry.get("type", "default"))
        if kind != "default":
            _refuse(where, f"{key}.rope_type", kind, "only the default RoPE (no scaling) is supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse(where, "partial_rotary_factor", partial, f"{hf['model_type']} rotates every head dim")
    return float(theta), float(partial)


def _check_hf_layers(hf: dict, where: str) -> None:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if not types:  # older Qwen2 configs: layers from max_window_layers on slide when use_sliding_window is set
        first = hf.get("max_window_layers") or 0
        types = ["sliding_attention" if hf.get("use_sliding_window") and i >= first else "full_attention"
                 for i in range(n)]
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        _refuse(where, "layer_types", unknown, "only full_attention layers are supported")
    # transformers ignores sliding_window (and so may we) unless use_sliding_window is set
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding and hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
        _refuse(where, "use_sliding_window", True, f"layers {sliding[:8]} use a sliding window of "
                f"{hf['sliding_window']} tokens; only full causal attention is supported")


def hf_config_to_ours(hf: dict, where: str = "config.json", name: str = "") -> ModelConfig:
    """Our ModelConfig (every layer `attention`) for a Hugging Face Llama / Qwen2 / Qwen3 config.json dict.
    Refuses, naming the key, what the model zoo cannot reproduce exactly."""
    model_type = hf.get("model_type")
    if model_type == "hybrid_lm":
        raise ValueError(f"{where}: a folder written by `hybrid-lm export`; run `hybrid-lm import` on it first and "
                         f"convert the native folder that writes")
    if model_type not in HF_MODEL_TYPES:
        supported = "/".join(HF_MODEL_TYPES + ("qwen3_next", "deepseek_v32"))  # the last two: their own modules
        raise ValueError(f"{where}: key 'model_type' = {model_type!r}: unsupported model type; hybrid-lm convert "
                         f"reads Hugging Face {supported} models")
    archs = hf.get("architectures") or []
    if any(not a.endswith("ForCausalLM") for a in archs):
        _refuse(where, "architectures", archs, "only *ForCausalLM checkpoints can be converted")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        _refuse(where, "hidden_act", act, "the MLP is SwiGLU, so only silu is supported")
    if hf.get("mlp_bias"):
        _refuse(where, "mlp_bias", True, "the MLP projections have no bias")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if not isinstance(hf.get(k), int)]
    if missing:
        raise ValueError(f"{where}: key '{missing[0]}' is missing or not an integer; is this a complete "
                         f"{model_type} config.json?")
    theta, partial = _hf_rope(hf, where)
    _check_hf_layers(hf, where)
    heads = hf["num_attention_heads"]
    attention = {"qk_norm": model_type == "qwen3", "partial_rotary_factor": partial,
                 # Qwen2 always has q/k/v biases; Llama and Qwen3 tie them (and an o_proj bias) to attention_bias
                 "attention_bias": model_type == "qwen2" or bool(hf.get("attention_bias", False))}
    data = {
        "name": name, "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
        "num_hidden_layers": hf["num_hidden_layers"], "layer_types": ["attention"] * hf["num_hidden_layers"],
        "num_attention_heads": heads, "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads, "intermediate_size": hf["intermediate_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", 4096), "rope_theta": theta,
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "initializer_range": float(hf.get("initializer_range", 0.02)), "mixers": {"attention": attention},
    }
    return config_from_dict(data, where)


def _load_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    try:
        if (folder / "model.safetensors").is_file():
            return load_file(str(folder / "model.safetensors"))
        for index_name, loader in (("model.safetensors.index.json", load_file),
                                   ("pytorch_model.bin.index.json", _torch_load)):
            if (folder / index_name).is_file():
                shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
                state = {}
                for shard in shards:
                    state.update(loader(str(folder / shard)))
                return state
        if (folder / "pytorch_model.bin").is_file():
            return _torch_load(str(folder / "pytorch_model.bin"))
    except (SafetensorError, OSError, KeyError, RuntimeError) as e:
        raise ValueError(f"{folder}: cannot read the weights ({type(e).__name__}: {e})") from None
    raise ValueError(f"{folder} has config.json but no weights: expected model.safetensors, "
                     f"model.safetensors.index.json (sharded) or pytorch_model.bin")


def _torch_load(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _hf_state_dict(state: dict[str, torch.Tensor], model_type: str, folder: Path) -> dict[str, torch.Tensor]:
    """Rename `model.layers.{i}.self_attn.*` etc. to our names; drop what carries no information."""
    out, unknown = {}, []
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):  # a recomputable buffer some old checkpoints store
            continue
        name = key[len("model."):] if key.startswith("model.") else key
        name = name.replace(".self_attn.", ".mixer.")
        if name.endswith("mixer.o_proj.bias"):
            # our o_proj has no bias; a zero one (Llama/Qwen3 with attention_bias as initialised) changes nothing
            if tensor.count_nonzero():
                raise ValueError(f"{folder}: tensor {key!r} is a non-zero o_proj bias, which hybrid_lm's "
                                 f"attention does not have; this {model_type} model cannot be converted exactly")
            continue
        if not (name.startswith(("layers.", "embed_tokens.", "norm.")) or name == "lm_head.weight"):
            unknown.append(key)
        out[name] = tensor
    if unknown:
        raise ValueError(f"{folder}: unexpected tensors {unknown[:5]} for a {model_type} *ForCausalLM checkpoint")
    return out


# --------------------------------------------------------------------------------------------- the target model
def _choose_layers(cfg: ModelConfig, spec: str | list[int]) -> list[int]:
    kinds = [cfg.mixer_type(t) for t in cfg.layer_types]
    attention = [i for i, k in enumerate(kinds) if k == "attention"]
    if spec == "none":
        return []
    if spec == "all":
        chosen = [i for i in attention if cfg.mixer_config(cfg.layer_types[i]).sliding_window is None]
        if not chosen and "dsa" in kinds:  # already sparse (e.g. a DeepSeek-V3.2): a plain import
            return []
        if not chosen:
            raise ValueError(f"--dsa-layers all: the model has no full attention layer to convert (layer_types: "
                             f"{cfg.layer_types}); use --dsa-layers none to copy it unchanged")
        return chosen
    for i in spec:
        if not 0 <= i < cfg.num_hidden_layers:
            raise ValueError(f"--dsa-layers: layer {i} does not exist; the model has {cfg.num_hidden_layers} "
                             f"layers (0..{cfg.num_hidden_layers - 1})")
        if kinds[i] != "attention":
            raise ValueError(f"--dsa-layers: layer {i} is a {cfg.layer_types[i]!r} layer ({kinds[i]}); only "
                             f"attention layers can become DSA layers; this model's are {attention}")
    return sorted(set(spec))


def _dsa_settings(cfg: ModelConfig, layer: int, n_heads: int, head_dim: int, topk: int) -> dict:
    """The DSA section for a converted layer: its attention settings plus the index settings."""
    layer_type = cfg.layer_types[layer]
    attention = cfg.mixer_config(layer_type)
    assert isinstance(attention, AttentionConfig) and not isinstance(attention, DSAConfig)
    if attention.sliding_window is not None:
        raise ValueError(f"--dsa-layers: layer {layer} ({layer_type!r}) is sliding-window attention (window "
                         f"{attention.sliding_window}); DSA selects its own keys, so convert full attention "
                         f"layers only")
    copied = {f.name: getattr(attention, f.name) for f in fields(AttentionConfig)}
    return to_dict(DSAConfig(**copied, index_n_heads=n_heads, index_head_dim=head_dim, index_topk=topk))


def _section_name(settings: dict, source_type: str, sections: dict, layer_types: list[str]) -> str:
    """An existing DSA section with these exact settings, else a free name ("dsa" when possible)."""
    for name, entry in sections.items():
        if entry.get("type", name) == "dsa" and {k: v for k, v in entry.items() if k != "type"} == settings:
            return name
    candidates = ["dsa", f"dsa_{source_type}"] + [f"dsa_{source_type}_{n}" for n in range(2, 100)]
    return next(c for c in candidates if c not in layer_types and c not in sections)


def _target_config(cfg: ModelConfig, spec, n_heads: int, head_dim: int, topk: int,
                   where: str) -> tuple[ModelConfig, list[int]]:
    chosen = _choose_layers(cfg, spec)
    data = config_to_dict(cfg)
    sections, types = data["mixers"], list(cfg.layer_types)
    # an unused section may be replaced: only sections some layer uses survive the conversion
    sections = {n: s for n, s in sections.items() if n in types}
    renamed = {}
    for i in chosen:
        source_type = cfg.layer_types[i]
        if source_type not in renamed:
            settings = _dsa_settings(cfg, i, n_heads, head_dim, topk)
            name = _section_name(settings, source_type, sections, types)
            sections[name] = settings if name == "dsa" else {"type": "dsa", **settings}
            renamed[source_type] = name
        types[i] = renamed[source_type]
    data["layer_types"] = types
    data["mixers"] = {n: s for n, s in sections.items() if n in types}
    if chosen and data.get("name"):
        data["name"] = f"{data['name']}-dsa"
    return config_from_dict(data, where), chosen


def _common_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The source's float dtype; mixed sources go to fp32, which holds bf16/fp16 values exactly."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _build_converted(config: ModelConfig, state: dict[str, torch.Tensor], converted: list[int], seed: int,
                     where: str) -> HybridLM:
    dtype = _common_dtype(state)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model = build_model(config, device="meta")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{where}: the source's tensors do not fit its config ({str(e).splitlines()[-1].strip()})"
                         ) from None
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    fresh = [k for k in missing if any(k.startswith(f"layers.{i}.mixer.indexer.") for i in converted)]
    lacking = sorted(set(missing) - set(fresh))
    if lacking or unexpected:
        raise ValueError(f"{where}: the source's tensors do not match its config: missing {lacking[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    _init_indexers(model, converted, seed, dtype)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "a tensor was left uninitialised"
    return model


def _init_indexers(model: HybridLM, layers: list[int], seed: int, dtype: torch.dtype) -> None:
    """The init `HybridLM.reset_parameters` gives indexer modules (normal(0, initializer_range) projections,
    unit LayerNorm), drawn from a seeded generator so a conversion is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    for i in layers:
        indexer = model.layers[i].mixer.indexer
        indexer.to_empty(device="cpu")
        with torch.no_grad():
            for module in indexer.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, 0.0, std, generator=generator)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                elif hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        indexer.to(dtype)


# --------------------------------------------------------------------------------------------- writing
def _check_out(src: Path, out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a folder; choose another OUT")
    if out.exists() and src.exists() and out.resolve() in (src.resolve(), *src.resolve().parents):
        raise ValueError(f"output {str(out)!r} would replace the source {str(src)!r}; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"output {str(out)!r} exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def staged_dir(out: Path, force: bool):
    """A new folder beside `out` to write into. On a clean exit it is fsynced and renamed to `out` (a non-empty
    `out`, allowed by `force`, set aside and removed after); on an error it is removed, so `out` is never left
    half-written and an earlier export there survives a failed one."""
    out_abs = out.resolve()
    tmp = out_abs.with_name(f"{out_abs.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out_abs.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        _replace_dir(tmp, out_abs, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_abs.parent)


def copy_tokenizer_files(folders: list[Path], dst: Path) -> list[str]:
    """Copy each of TOKENIZER_FILES from the first of `folders` holding it into `dst`, unless `dst` has it."""
    copied = []
    for name in TOKENIZER_FILES:
        found = next((f / name for f in folders if (f / name).is_file()), None)
        if found is not None and not (dst / name).exists():
            shutil.copy2(found, dst / name)
            copied.append(name)
    return copied


def write_hf_folder(out: Path, force: bool, state: dict, hf_config: dict, folders: list[Path]) -> None:
    """A transformers folder (model.safetensors, config.json, the tokenizer files of `folders`), staged."""
    with staged_dir(out, force) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        copy_tokenizer_files(folders, tmp)


def _write(model: HybridLM, out: Path, force: bool, folders: list[Path], provenance: dict) -> Path:
    with staged_dir(out, force) as tmp:
        save_model(model, tmp)
        provenance["tokenizer_files"] = copy_tokenizer_files(folders, tmp)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=1) + "\n")
        write_manifest(tmp)  # load_model trusts a folder only when its manifest verifies
    return out


def _replace_dir(tmp: Path, out: Path, force: bool) -> None:
    """Move `tmp` to `out` in one rename; a non-empty `out` (allowed by --force) is set aside and removed after."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        assert force
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
