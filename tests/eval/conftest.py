"""Fixtures for the evaluation tests: a small synthetic corpus prepared once per session, tiny model YAMLs and a
tiny saved model (with a train_config.yaml, like a checkpoint) to evaluate."""

import json
import random

import pytest
import torch
import yaml

import hybrid_lm
from hybrid_lm.data import DataConfig, prepare_data

_WORDS = ("thou art the king and i am thy servant what light through yonder window breaks good my lord "
          "hark the night is long sweet prince fair lady come hither now speak no more").split()

TINY = {
    "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "mixers": {"dsa": {"index_n_heads": 2, "index_head_dim": 8, "index_topk": 16},
               "gated_deltanet": {"num_heads": 2, "head_k_dim": 16, "head_v_dim": 16}},
}


def _document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
        lines.append(f"{rng.choice(['ROMEO', 'JULIET', 'KING'])}:\n{words.capitalize()}, {rng.randint(0, 99)}.")
    return "\n\n".join(lines)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads than idle cores only adds waiting
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "plays.jsonl"
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": _document(rng)}) + "\n" for _ in range(150)))
    return path


@pytest.fixture(scope="session")
def data_cfg(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("data_cache")
    return DataConfig(source=str(corpus), vocab_size=400, cache_dir=str(cache), val_fraction=0.15)


@pytest.fixture(scope="session")
def prepared(data_cfg):
    return prepare_data(data_cfg)


@pytest.fixture(scope="session")
def model_yamls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, layers in (("gdn", ["gated_deltanet", "gated_deltanet"]), ("gdn-dsa", ["gated_deltanet", "dsa"])):
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({"name": name, **TINY, "layer_types": layers}))
    return paths


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, prepared, data_cfg, model_yamls):
    """A randomly initialised GDN+DSA model saved as a checkpoint-like folder (weights, config, tokenizer, the
    training config naming its data)."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    torch.manual_seed(0)
    cfg = hybrid_lm.config_replace(hybrid_lm.load_config(model_yamls["gdn-dsa"]), vocab_size=prepared.vocab_size)
    hybrid_lm.save_model(hybrid_lm.build_model(cfg), folder)
    train_cfg = {"model": str(model_yamls["gdn-dsa"]), "data": data_cfg.to_dict(), "seq_len": 64}
    (folder / "train_config.yaml").write_text(yaml.safe_dump(train_cfg))
    (folder / "tokenizer.json").write_bytes(prepared.tokenizer_path.read_bytes())
    return folder
