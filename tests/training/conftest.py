"""Fixtures for the trainer tests: a small synthetic corpus, a tiny hybrid model YAML and training YAMLs in tmp dirs.

The corpus is prepared once per session (its cache folder is shared), so each test only pays for training steps.
"""

import json
import random

import pytest
import torch
import yaml

TINY_MODEL = {
    "name": "tiny-test",
    "vocab_size": 512,
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "layer_pattern": ["gated_deltanet", "dsa", "gated_deltanet", "attention"],
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "mixers": {"dsa": {"index_n_heads": 2, "index_head_dim": 8, "index_topk": 8},
               "gated_deltanet": {"num_heads": 2, "head_k_dim": 16, "head_v_dim": 16}},
}

_WORDS = ("thou art the king and i am thy servant what light through yonder window breaks good my lord "
          "hark the night is long sweet prince fair lady come hither now speak no more").split()


def _document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        speaker = rng.choice(["ROMEO", "JULIET", "HAMLET", "KING"])
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
        lines.append(f"{speaker}:\n{words.capitalize()}.")
    return "\n\n".join(lines)


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: with more threads than idle cores, OpenMP waits cost 10x the arithmetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    path = folder / "plays.jsonl"
    path.write_text("".join(json.dumps({"text": _document(rng)}) + "\n" for _ in range(120)))
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def model_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-test.yaml"
    path.write_text(yaml.safe_dump(TINY_MODEL))
    return path


@pytest.fixture
def write_config(tmp_path, corpus, data_cache, model_yaml):
    """Write a training YAML for the tiny model (overrides merged in) and return its path."""

    def write(name: str = "tiny", **overrides) -> str:
        cfg = {
            "model": str(model_yaml),
            "data": {"source": str(corpus), "vocab_size": 300, "cache_dir": str(data_cache), "val_fraction": 0.1},
            "seq_len": 32, "batch_size": 4, "max_steps": 6, "dsa_stage": "sparse",
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
            "eval_every": 1000, "eval_batches": 2, "log_every": 1, "save_every": 1000, "keep_last": 2,
            "sample_tokens": 8, "out_dir": str(tmp_path / "runs" / name),
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    return write
