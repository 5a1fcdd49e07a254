"""Export a hybrid_lm model to a Hugging Face transformers folder, and import such a folder back.

An export holds everything `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` needs on a machine
without hybrid_lm: `config.json` (`model_type: hybrid_lm`, `auto_map`), the shipped `configuration_hybrid_lm.py`,
the generated `modeling_hybrid_lm.py` (see `flatten.py`), safetensors weights (sharded with
`model.safetensors.index.json` above `--max-shard-size`), the run's tokenizer files and `generation_config.json`.
Weight names are the native ones under `model.` (`model.layers.0.mixer.q_proj.weight`); with tied embeddings the
head is stored once, as `model.embed_tokens.weight`. Importing strips the prefix and writes a native model folder
whose tensors are bit-identical to the export's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..config import config_from_dict, config_to_dict
from ..convert import staged_dir
from ..model.io import build_model, load_model, resolve_model_dir, save_model
from ..utils.files import read_json, write_manifest

log = logging.getLogger("hybrid_lm")

DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
AUTO_MAP = {"AutoConfig": "configuration_hybrid_lm.HybridLMConfig",
            "AutoModelForCausalLM": "modeling_hybrid_lm.HybridLMForCausalLM"}
WEIGHT_PREFIX = "model."
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_dtype(name: str) -> torch.dtype | None:
    """`auto` (keep the checkpoint's dtype) or a float dtype name; None means keep."""
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def parse_size(size: str | int) -> int:
    """Bytes from `5GB`, `500MB`, `2GiB`, `100KB` or a plain integer."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = _SIZE.match(str(size))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max shard size {size!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def _tokenizer_ids(model_dir: Path) -> dict:
    """eos/bos/pad token ids for config.json and generation_config.json (empty without a tokenizer)."""
    if not (model_dir / "tokenizer.json").is_file():
        warnings.warn(f"{model_dir} has no tokenizer.json: exporting without a tokenizer; pass one to "
                      f"transformers yourself (pipeline(..., tokenizer=...))", stacklevel=3)
        return {}
    from ..data.tokenizer import load_tokenizer

    try:
        _, info = load_tokenizer(model_dir)
    except ValueError as e:
        warnings.warn(f"tokenizer files copied, but no eos/bos ids recorded: {e}", stacklevel=3)
        return {}
    ids = {"eos_token_id": info.eos_id, "pad_token_id": info.eos_id}  # no pad token: pad with eos, as GPT-2
    if info.bos_id is not None:
        ids["bos_token_id"] = info.bos_id
    return ids


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def export_hf(source: str | Path, out_dir: str | Path, *, max_shard_size: str | int = "5GB",
              dtype: str = "auto") -> Path:
    """Write a transformers folder for the model at `source` (run, checkpoint or saved-model folder)."""
    from transformers import GenerationConfig

    from .configuration_hybrid_lm import HybridLMConfig
    from .flatten import build_modeling_source
    from .modeling_hybrid_lm import HybridLMForCausalLM

    torch_dtype, shard_bytes = parse_dtype(dtype), parse_size(max_shard_size)
    model_dir = resolve_model_dir(source)
    out = Path(out_dir)
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"OUT_DIR {str(out)!r} is the source folder; export into a new folder")
    _check_out_dir(out)
    modeling = build_modeling_source()
    model = load_model(model_dir, dtype=torch_dtype).eval()
    _check_exportable(model, modeling)
    ids = _tokenizer_ids(model_dir)
    config = HybridLMConfig.from_native_dict(config_to_dict(model.config), **ids)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["HybridLMForCausalLM"]
    wrapper = HybridLMForCausalLM.from_native(model, config)
    wrapper.generation_config = GenerationConfig(**ids)
    # written whole into a staging folder beside OUT_DIR, then moved in: a failure anywhere up to the move (a bad
    # source, a full disk) leaves an earlier export in OUT_DIR as it was
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        wrapper.save_pretrained(staging, max_shard_size=shard_bytes)  # safetensors: the default since 4.35
        (staging / "configuration_hybrid_lm.py").write_text(
            (Path(__file__).parent / "configuration_hybrid_lm.py").read_text(encoding="utf-8"), encoding="utf-8")
        (staging / "modeling_hybrid_lm.py").write_text(modeling, encoding="utf-8")
        copied = _copy_tokenizer(model_dir, staging)
        out.mkdir(exist_ok=True)
        _clear_earlier_export(out)
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s -> %s (%s; tokenizer files: %s)", model_dir, out, wrapper.dtype, copied or "none")
    return out


def _check_out_dir(out: Path) -> None:
    """OUT_DIR must be new, empty or an earlier export (replaced once the new one is written)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT_DIR {str(out)!r} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    config = out / "config.json"
    if not config.is_file() or read_json(config).get("model_type") != "hybrid_lm":
        raise ValueError(f"OUT_DIR {str(out)!r} is not empty and holds no earlier export; choose a new folder")


def _clear_earlier_export(out: Path) -> None:
    """An earlier export's weights and tokenizer files go: the new export may shard differently or have no
    tokenizer. Its other files are overwritten by the new ones or kept."""
    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    for pattern in ("model*.safetensors", "model.safetensors.index.json"):
        for path in out.glob(pattern):
            path.unlink()


def _check_exportable(model, modeling: str) -> None:
    """Every mixer class must come from a module flattened into `modeling` (a user-registered one would not)."""
    package = __name__.split(".")[0]
    bundled = {f"{package}.{m.replace('/', '.')}" for m in re.findall(rf"^# ---- {package}/(\S+)\.py ----$",
                                                                      modeling, flags=re.MULTILINE)}
    for layer in model.layers:
        module = type(layer.mixer).__module__
        if module not in bundled:
            raise ValueError(f"layer type {layer.layer_type!r} uses {type(layer.mixer).__qualname__} from "
                             f"{module}, which the export does not bundle; only hybrid_lm's built-in mixers can "
                             f"be exported")


def _read_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{hf_dir} holds neither model.safetensors nor model.safetensors.index.json")
    state = {}
    for name in files:
        try:
            state.update(load_file(str(hf_dir / name)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{hf_dir / name} is missing, truncated or corrupted ({e})") from None
    return state


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Turn an exported folder back into a native model folder (`hybrid_lm.load_model(out_dir)` reads it)."""
    from .configuration_hybrid_lm import HybridLMConfig

    hf_dir, out = Path(hf_dir), Path(out_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{str(hf_dir)!r} has no config.json: pass a folder written by `hybrid-lm export`")
    model_type = read_json(config_path).get("model_type")
    if model_type != HybridLMConfig.model_type:
        raise ValueError(f"{config_path} has model_type {model_type!r}, not {HybridLMConfig.model_type!r}: only "
                         f"folders written by `hybrid-lm export` can be imported")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"OUT {str(out)!r} exists and is not empty; import into a new (or empty) folder")
    native = HybridLMConfig.from_pretrained(str(hf_dir)).to_native_dict()
    config = config_from_dict(native, str(config_path))
    state = _read_state_dict(hf_dir)
    foreign = [k for k in state if not k.startswith(WEIGHT_PREFIX)]
    if foreign:
        raise ValueError(f"{hf_dir}: weights {foreign[:3]} lack the {WEIGHT_PREFIX!r} prefix of an export")
    state = {k[len(WEIGHT_PREFIX):]: v for k, v in state.items()}
    model = build_model(config, device="meta")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: weights do not match config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    # written whole into a staging folder beside OUT, then renamed (an empty OUT is replaced): a failure leaves no
    # half-written OUT
    with staged_dir(out, force=False) as staging:
        save_model(model, staging)
        _copy_tokenizer(hf_dir, staging)
        write_manifest(staging)  # last, so load_model trusts the folder only once every file is in place
    return out


__all__ = ["export_hf", "import_hf", "parse_dtype", "parse_size", "DTYPES"]
