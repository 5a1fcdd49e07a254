"""`hybrid-lm convert`'s refusal of a Hugging Face folder it cannot read names every model type it does read, and
says how to convert a folder written by `hybrid-lm export` (import it first)."""

import json
import warnings

import pytest
import torch

import hybrid_lm
from hybrid_lm.convert import convert_checkpoint
from hybrid_lm.hf import export_hf, import_hf


def test_unsupported_model_type_lists_every_supported_one(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match=r"'mistral'.*qwen3_next.*deepseek_v32"):
        convert_checkpoint(tmp_path / "m", tmp_path / "out")


def test_an_export_folder_is_pointed_to_hybrid_lm_import(tmp_path):
    cfg = hybrid_lm.config_from_dict(dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          layer_types=["attention"]))
    torch.manual_seed(0)
    hybrid_lm.save_model(hybrid_lm.build_model(cfg), tmp_path / "m")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no tokenizer.json")
        export_hf(tmp_path / "m", tmp_path / "hf")
    with pytest.raises(ValueError, match="hybrid-lm import"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    convert_checkpoint(import_hf(tmp_path / "hf", tmp_path / "native"), tmp_path / "out")  # what it advises
