"""`evaluate`'s settings: a cached cell computed under other settings is never reused; held-out data and lengths."""

from hybrid_lm.eval import runner
from hybrid_lm.eval.runner import EvalConfig, evaluate

SMALL = dict(tasks=["perplexity", "passkey"], lengths=[64], samples=2, ppl_tokens=128, batch_tokens=256)


def _count(monkeypatch) -> dict:
    state = {"calls": 0}
    original = runner._Context.compute

    def compute(self, cell):
        state["calls"] += 1
        return original(self, cell)

    monkeypatch.setattr(runner._Context, "compute", compute)
    return state


def test_a_bf16_rerun_does_not_reuse_fp32_cells(saved_model, tmp_path, monkeypatch):
    counting = _count(monkeypatch)
    fp32 = evaluate(saved_model, EvalConfig(**SMALL), out_dir=tmp_path, progress=False)
    counting["calls"] = 0
    bf16 = evaluate(saved_model, EvalConfig(**SMALL, dtype="bf16"), out_dir=tmp_path, progress=False)
    assert counting["calls"] == len(fp32["cells"])  # every cell recomputed under autocast
    assert bf16["cells"][0]["loss"] != fp32["cells"][0]["loss"]
    counting["calls"] = 0
    evaluate(saved_model, EvalConfig(**SMALL), out_dir=tmp_path, progress=False)
    assert counting["calls"] == 0  # the fp32 cells are still there


def test_other_held_out_data_does_not_reuse_cached_cells(saved_model, tmp_path, monkeypatch, data_cfg):
    """`hybrid-lm eval CKPT --data OTHER` into the same folder evaluates on OTHER, not the cached numbers."""
    from hybrid_lm.data import DataConfig

    counting = _count(monkeypatch)
    own = evaluate(saved_model, EvalConfig(**SMALL), out_dir=tmp_path, progress=False)
    other = DataConfig(source=data_cfg.source, vocab_size=data_cfg.vocab_size, cache_dir=data_cfg.cache_dir,
                       val_fraction=0.4)  # another held-out split: other text
    counting["calls"] = 0
    again = evaluate(saved_model, EvalConfig(**SMALL), out_dir=tmp_path, data=other, progress=False)
    assert counting["calls"] == len(own["cells"])
    assert again["cells"][0]["loss"] != own["cells"][0]["loss"]
    counting["calls"] = 0
    evaluate(saved_model, EvalConfig(**SMALL), out_dir=tmp_path, progress=False)
    assert counting["calls"] == 0


def test_mqar_pool_follows_the_training_mix_when_other_data_is_named(saved_model, tmp_path, data_cfg):
    """The pool is the one the model trained on (its run's recall mix), also when `--data` names the plain text."""
    import shutil

    import yaml

    from hybrid_lm.eval.mix import MixConfig, write_recall_mix

    mix = write_recall_mix(data_cfg, tmp_path / "mix", MixConfig(recall_fraction=0.3, tasks={"mqar": 1.0},
                                                                  min_length=32, max_length=64, pool_size=16))
    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    train_cfg = yaml.safe_load((model / "train_config.yaml").read_text())
    train_cfg["data"] = {**train_cfg["data"], "source": str(mix.source), "val_fraction": mix.val_fraction}
    (model / "train_config.yaml").write_text(yaml.safe_dump(train_cfg))
    cfg = EvalConfig(**{**SMALL, "tasks": ["mqar"], "mqar_pairs": 4})
    assert evaluate(model, cfg, out_dir=tmp_path / "a", progress=False)["settings"]["pool_size"] == 16
    summary = evaluate(model, cfg, out_dir=tmp_path / "b", data=data_cfg, progress=False)
    assert summary["settings"]["pool_size"] == 16


def test_data_naming_the_training_corpus_keeps_the_runs_held_out_split(saved_model, tmp_path, data_cfg):
    """`hybrid-lm eval CKPT --data SOURCE` with the run's own corpus evaluates on the run's held-out documents
    (its val_fraction 0.15 and seed), not on a default 5% split that can hold documents the model trained on."""
    from hybrid_lm.eval.runner import _data_config

    data, _, _ = _data_config(saved_model, data_cfg.source)
    assert data.val_fraction == data_cfg.val_fraction and data.seed == data_cfg.seed
    own = evaluate(saved_model, EvalConfig(**SMALL), out_dir=tmp_path / "a", progress=False)
    named = evaluate(saved_model, EvalConfig(**SMALL), out_dir=tmp_path / "b", data=data_cfg.source, progress=False)
    assert named["cells"][0]["loss"] == own["cells"][0]["loss"]
    other, _, _ = _data_config(saved_model, "shakespeare")  # another corpus: its own defaults
    assert other.source == "shakespeare" and other.val_fraction == 0.05


def test_perplexity_windows_of_one_token_are_refused_by_name():
    import pytest

    with pytest.raises(ValueError, match="lengths = \\[1, 64\\]: perplexity needs windows of at least 2"):
        EvalConfig(**{**SMALL, "lengths": [1, 64]}).validate()
    EvalConfig(**{**SMALL, "tasks": ["passkey"], "lengths": [1]}).validate()  # only perplexity needs two tokens
