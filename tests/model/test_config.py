import dataclasses
import glob
import os

import pytest
import yaml

import hybrid_lm
from hybrid_lm.config import config_to_dict

from .helpers import TINY

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "model_configs", "*.yaml")))


def write(tmp_path, data, name="m.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def base(**changes):
    return {**TINY, "layer_pattern": ["gated_deltanet", "dsa"], "num_hidden_layers": 4, **changes}


def test_zoo_has_the_required_configs():
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    assert {"tiny-hybrid", "dense-125m", "gdn-125m", "gdn-attn-125m", "gdn-dsa-125m", "dsa-125m",
            "gdn-dsa-350m", "gdn-dsa-1b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_builds_and_round_trips(path, tmp_path):
    cfg = hybrid_lm.load_config(path)
    hybrid_lm.save_config(cfg, tmp_path / "again.yaml")
    assert hybrid_lm.load_config(tmp_path / "again.yaml") == cfg
    model = hybrid_lm.build_model(cfg, device="meta")
    assert len(model.layers) == cfg.num_hidden_layers
    assert [b.layer_type for b in model.layers] == cfg.layer_types
    params = model.num_parameters()
    size = os.path.basename(path).split("-")[-1][:-5]
    expected = {"125m": 125e6, "350m": 350e6, "1b": 1e9}.get(size)
    if expected:
        assert 0.8 * expected < params < 1.25 * expected, params


def test_pattern_tiles_and_explicit_list_is_equal(tmp_path):
    a = hybrid_lm.load_config(write(tmp_path, base()))
    assert a.layer_types == ["gated_deltanet", "dsa"] * 2
    data = base()
    data.pop("layer_pattern")
    data["layer_types"] = ["gated_deltanet", "dsa"] * 2
    assert hybrid_lm.load_config(write(tmp_path, data, "b.yaml")) == a


def test_alias_gives_a_mixer_a_second_setting(tmp_path):
    data = base(layer_pattern=["local", "attention"], mixers={"local": {"type": "attention", "sliding_window": 4}})
    cfg = hybrid_lm.load_config(write(tmp_path, data))
    assert cfg.mixer_type("local") == "attention" and cfg.mixers["local"].sliding_window == 4
    hybrid_lm.save_config(cfg, tmp_path / "again.yaml")
    assert hybrid_lm.load_config(tmp_path / "again.yaml") == cfg
    model = hybrid_lm.build_model(cfg)
    assert model.layers[0].mixer.settings.sliding_window == 4 and model.layers[1].mixer.settings.sliding_window is None


@pytest.mark.parametrize("change, words", [
    (dict(hidden_sise=32), ["unknown key 'hidden_sise'", "hidden_size"]),
    (dict(layer_pattern=["gated_deltanet", "mamba"]), ["layer_types[1]", "'mamba'", "attention", "dsa"]),
    (dict(num_key_value_heads=3), ["num_key_value_heads", "3", "divide"]),
    (dict(layer_pattern=["gated_deltanet", "dsa", "attention"]), ["layer_pattern", "tile", "num_hidden_layers"]),
    (dict(mixers={"dsa": {"index_topk": 0}}), ["mixers.dsa.index_topk", "0", ">= 1"]),
    (dict(mixers={"dsa": {"index_topk": "many"}}), ["mixers.dsa.index_topk", "'many'", "integer"]),
    (dict(mixers={"dsa": {"topk": 8}}), ["unknown key 'mixers.dsa.topk'", "index_topk"]),
    (dict(mixers={"gated_deltanet": {"num_heads": 3, "num_v_heads": 4}}), ["num_v_heads", "multiple"]),
    (dict(mixers={"rwkv": {}}), ["mixers.rwkv", "unknown mixer type", "gated_deltanet"]),
    (dict(hidden_size=30, head_dim=None), ["head_dim"]),
    (dict(rope_theta=0), ["rope_theta", "> 0"]),
    (dict(rms_norm_eps=-1e-6), ["rms_norm_eps", ">= 0"]),
    (dict(initializer_range=-0.02), ["initializer_range", ">= 0"]),
    (dict(mixers={"dsa": 64}), ["mixers.dsa", "64", "mapping"]),
    (dict(mixers={"gated_deltanet": {"num_heads": -1}}), ["mixers.gated_deltanet.num_heads", "-1", "positive"]),
    (dict(mixers={"gated_deltanet": {"head_k_dim": 0}}), ["mixers.gated_deltanet.head_k_dim", "0", "positive"]),
])
def test_bad_configs_name_file_key_and_value(tmp_path, change, words):
    path = write(tmp_path, base(**change))
    with pytest.raises(ValueError) as err:
        hybrid_lm.load_config(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        hybrid_lm.load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        hybrid_lm.load_config(tmp_path / "bad.yaml")


def test_config_replace_validates():
    cfg = hybrid_lm.load_config(CONFIGS[0])
    changed = hybrid_lm.config_replace(cfg, max_position_embeddings=77)
    assert changed.max_position_embeddings == 77 and cfg.max_position_embeddings != 77
    with pytest.raises(ValueError, match="num_key_value_heads"):
        hybrid_lm.config_replace(cfg, num_key_value_heads=5)


def test_saved_yaml_is_plain_and_complete(tmp_path):
    cfg = hybrid_lm.load_config(write(tmp_path, base()))
    data = config_to_dict(cfg)
    assert set(data["mixers"]) == {"gated_deltanet", "dsa", "attention"}
    assert {f.name for f in dataclasses.fields(cfg)} - {"mixer_aliases"} == set(data)


def test_overrides_apply_to_the_yaml_as_written(tmp_path):
    # sizes the YAML leaves out follow the overridden ones, as if the YAML had been edited by hand
    data = {k: v for k, v in base().items() if k not in ("head_dim", "intermediate_size", "num_key_value_heads")}
    changes = {"hidden_size": 64, "num_attention_heads": 8, "mixers": {"dsa": {"index_topk": 4}}}
    got = hybrid_lm.load_config(write(tmp_path, data), changes)
    edited = {**data, "hidden_size": 64, "num_attention_heads": 8,
              "mixers": {**data["mixers"], "dsa": {**data["mixers"]["dsa"], "index_topk": 4}}}
    assert got == hybrid_lm.load_config(write(tmp_path, edited, "edited.yaml"))
    assert (got.head_dim, got.num_key_value_heads, got.mixers["dsa"].index_topk) == (8, 8, 4)
    assert got.mixers["dsa"].index_n_heads == TINY["mixers"]["dsa"]["index_n_heads"]  # merged, not replaced
    # config_replace on a built config keeps what it derived (documented)
    kept = hybrid_lm.config_replace(hybrid_lm.load_config(write(tmp_path, data)), hidden_size=64)
    assert kept.intermediate_size == hybrid_lm.load_config(write(tmp_path, data)).intermediate_size
