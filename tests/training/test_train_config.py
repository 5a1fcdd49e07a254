"""Training YAMLs: strict loading, paths relative to the YAML, --set overrides, shipped configs."""

from pathlib import Path

import pytest
import yaml

import hybrid_lm
from hybrid_lm.training.config import (TrainConfig, apply_overrides, default_config_path, dump_train_config,
                                       load_train_config)
from hybrid_lm.zoo import find_config

REPO = Path(hybrid_lm.__file__).resolve().parents[1]


def _write(tmp_path, data, name="t.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_points_at_the_tiny_hybrid():
    path = default_config_path()
    assert path == REPO / "train" / "configs" / "default.yaml"
    cfg = load_train_config()
    assert Path(cfg.model) == (REPO / "model_configs" / "tiny-hybrid.yaml").resolve()
    assert cfg.out_dir == str(Path("runs") / "default")


@pytest.mark.parametrize("name", ["default", "dense-small", "dsa-warmup", "dsa-sparse", "deepseek-v32-tiny",
                                  "qwen3-next-tiny"])
def test_shipped_configs_load_and_name_existing_models(name):
    cfg = load_train_config(REPO / "train" / "configs" / f"{name}.yaml")
    if cfg.model is not None:
        hybrid_lm.load_config(find_config(cfg.model))  # the model YAML (path or zoo name) exists and is valid
    else:
        assert Path(cfg.init_from).is_absolute()


def test_paths_are_relative_to_the_yaml(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = _write(sub, {"model": "../models/m.yaml", "data": {"source": "corpus.txt", "cache_dir": "cache"},
                        "out_dir": "../runs/x"})
    cfg = load_train_config(path)
    assert cfg.model == str(tmp_path / "models" / "m.yaml")
    assert cfg.data.source == str(sub / "corpus.txt") and cfg.data.cache_dir == str(sub / "cache")
    assert cfg.out_dir == str(tmp_path / "runs" / "x")
    named = load_train_config(_write(sub, {"model": "m.yaml", "data": {"source": "shakespeare"}}))
    assert named.data.source == "shakespeare" and named.out_dir == str(Path("runs") / "t")
    zoo = load_train_config(_write(sub, {"model": "tiny-hybrid"}))  # a zoo name stays a name
    assert zoo.model == "tiny-hybrid" and find_config(zoo.model) == REPO / "model_configs" / "tiny-hybrid.yaml"


@pytest.mark.parametrize("data, words", [
    ({"model": "m.yaml", "lr": 1}, ["t.yaml", "'lr'", "valid keys", "optim"]),
    ({"model": "m.yaml", "optim": {"lrr": 1}}, ["t.yaml", "optim.lrr", "lr"]),
    ({"model": "m.yaml", "data": {"sorce": "x"}}, ["t.yaml", "sorce"]),
    ({"model": "m.yaml", "batch_size": "big"}, ["t.yaml", "batch_size", "'big'"]),
    ({"model": "m.yaml", "dsa_stage": "warmup"}, ["t.yaml", "dsa_stage", "dense_warmup"]),
    ({"model": "m.yaml", "activation_checkpointing": "on"}, ["t.yaml", "activation_checkpointing", "'on'"]),
    ({"model": "m.yaml", "activation_checkpointing": -2}, ["t.yaml", "activation_checkpointing", "number of blocks"]),
    ({"model": "m.yaml", "residual_dtype": "bf16", "dtype": "fp32"}, ["t.yaml", "residual_dtype", "dtype: fp32"]),
    ({"model": "m.yaml", "residual_dtype": "fp16"}, ["t.yaml", "residual_dtype", "'fp16'"]),
    ({"model": "m.yaml", "init_from": "run"}, ["exactly one of 'model'", "init_from"]),
    ({"model": "m.yaml", "optim": {"lr": 1e-3, "min_lr": 1e-2}}, ["min_lr"]),
])
def test_bad_yaml_names_file_and_key(tmp_path, data, words):
    with pytest.raises(ValueError) as err:
        load_train_config(_write(tmp_path, data))
    for word in words:
        assert word in str(err.value)


def test_set_overrides_are_yaml_parsed_and_strict(tmp_path):
    path = _write(tmp_path, {"model": "m.yaml"})
    cfg = load_train_config(path, ["optim.lr=1e-3", "batch_size=8", "data.tokenizer=null", "compile=true",
                                   "activation_checkpointing=true",
                                   "optim.betas=[0.8, 0.9]", "model_overrides.mixers={dsa: {index_topk: 4}}"])
    assert cfg.optim.lr == 1e-3 and cfg.batch_size == 8 and cfg.compile is True and cfg.activation_checkpointing
    assert cfg.optim.betas == [0.8, 0.9] and cfg.model_overrides == {"mixers": {"dsa": {"index_topk": 4}}}
    for bad, words in [("optim.lrr=1", ["optim.lrr", "valid keys at optim", "lr"]),
                       ("bogus=1", ["bogus", "valid keys at the top level"]),
                       ("seq_len.x=1", ["not a section"]),
                       ("optim.lr.x=1", ["not a section"]),
                       ("max_steps", ["KEY=VALUE"]),
                       ("max_steps=0", ["max_steps"])]:
        with pytest.raises(ValueError) as err:
            apply_overrides(cfg, [bad])
        for word in words:
            assert word in str(err.value)


def test_dump_and_load_round_trip(tmp_path):
    cfg = load_train_config(default_config_path(), ["optim.schedule=wsd", "sample_top_k=null"])
    path = tmp_path / "saved.yaml"
    path.write_text(dump_train_config(cfg))
    again = load_train_config(path)
    assert again == TrainConfig(**{**cfg.__dict__, "out_dir": again.out_dir})
    assert again.out_dir == str(tmp_path / "runs" / "default")  # relative out_dir follows the YAML's folder
