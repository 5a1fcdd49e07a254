"""`evaluate` and `hybrid-lm eval`: outputs, skipped lengths, and resuming without recomputing finished cells."""

import json

import pytest

from hybrid_lm.cli import main
from hybrid_lm.eval import runner
from hybrid_lm.eval.runner import EvalConfig, evaluate

SMALL = dict(lengths=[64, 128, 512], samples=2, mqar_pairs=4, ppl_tokens=256, topks=[4, 64], topk_lengths=[128],
             batch_tokens=256)


@pytest.fixture
def counting(monkeypatch):
    """Counts computed cells; `fail_at` makes the n-th computation raise KeyboardInterrupt (a Ctrl-C)."""
    state = {"calls": 0, "fail_at": None}
    original = runner._Context.compute

    def compute(self, cell):
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            raise KeyboardInterrupt
        return original(self, cell)

    monkeypatch.setattr(runner._Context, "compute", compute)
    return state


def test_evaluate_writes_results_plots_and_skips_lengths_past_the_model(saved_model, tmp_path):
    out = tmp_path / "eval"
    summary = evaluate(saved_model, EvalConfig(**SMALL), out_dir=out, progress=False)
    cells = summary["cells"]
    tasks = [(c["task"], c["length"], c["topk"]) for c in cells]
    assert ("perplexity", 64, None) in tasks and ("mqar", 128, 4) in tasks and ("passkey", 128, 64) in tasks
    too_long = [c for c in cells if c["length"] == 512]  # max_position_embeddings = 256
    assert too_long and all("exceeds max_position_embeddings" in c["skipped"] for c in too_long)
    for c in cells:
        if "skipped" not in c and c["task"] != "perplexity":
            assert 0 <= c["accuracy"] <= 1 and c["asked"] == (8 if c["task"] == "mqar" else 2)
    assert json.loads((out / "results.json").read_text())["model"]["trained_seq_len"] == 64
    for name in ("perplexity.png", "mqar.png", "passkey.png", "dsa_topk.png"):
        assert (out / name).stat().st_size > 1000


def test_interrupted_evaluation_resumes_with_the_same_numbers(saved_model, tmp_path, counting):
    cfg = EvalConfig(**{**SMALL, "lengths": [64, 128]})
    full = evaluate(saved_model, cfg, out_dir=tmp_path / "full", progress=False)
    n_cells = len(full["cells"])
    assert counting["calls"] == n_cells
    counting.update(calls=0, fail_at=4)
    with pytest.raises(KeyboardInterrupt, match="rerun"):
        evaluate(saved_model, cfg, out_dir=tmp_path / "cut", progress=False)
    assert len((tmp_path / "cut" / "cells.jsonl").read_text().splitlines()) == 3
    counting.update(calls=0, fail_at=None)
    resumed = evaluate(saved_model, cfg, out_dir=tmp_path / "cut", progress=False)
    assert counting["calls"] == n_cells - 3
    strip = [{k: v for k, v in c.items() if k != "seconds"} for c in resumed["cells"]]
    assert strip == [{k: v for k, v in c.items() if k != "seconds"} for c in full["cells"]]
    counting.update(calls=0)
    evaluate(saved_model, cfg, out_dir=tmp_path / "cut", progress=False)
    assert counting["calls"] == 0
    evaluate(saved_model, EvalConfig(**{**SMALL, "lengths": [64, 128], "samples": 3}), out_dir=tmp_path / "cut",
             progress=False)
    assert counting["calls"] == n_cells - 2  # new sample count: all but the perplexity cells are recomputed


def test_a_torn_last_line_is_recomputed(saved_model, tmp_path, counting):
    cfg = EvalConfig(**{**SMALL, "lengths": [64], "tasks": ["perplexity", "passkey"]})
    evaluate(saved_model, cfg, out_dir=tmp_path, progress=False)
    path = tmp_path / "cells.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:20])  # a crash mid-write
    counting.update(calls=0)
    evaluate(saved_model, cfg, out_dir=tmp_path, progress=False)
    assert counting["calls"] == 1
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_cli_eval_prints_a_table(saved_model, tmp_path, capsys):
    code = main(["eval", str(saved_model), "--tasks", "perplexity", "passkey", "--lengths", "64", "1024",
                 "--samples", "2", "--ppl-tokens", "128", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert code == 0 and "passkey" in text and "n/a" in text and "max_position_embeddings" in text
    assert main(["eval", str(tmp_path / "nowhere")]) == 2


def test_bad_settings_are_value_errors(saved_model, tmp_path):
    with pytest.raises(ValueError, match="tasks"):
        evaluate(saved_model, EvalConfig(tasks=["bleu"]), out_dir=tmp_path)
    with pytest.raises(ValueError, match="lengths"):
        evaluate(saved_model, EvalConfig(lengths=[]), out_dir=tmp_path)


def test_without_matplotlib_the_json_is_still_written(saved_model, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    cfg = EvalConfig(**{**SMALL, "lengths": [64], "tasks": ["perplexity", "passkey"]})
    with pytest.warns(UserWarning, match="matplotlib"):
        evaluate(saved_model, cfg, out_dir=tmp_path, progress=False)
    assert (tmp_path / "results.json").is_file() and not list(tmp_path.glob("*.png"))


def test_mqar_pool_defaults_to_the_training_mix(saved_model, tmp_path, data_cfg):
    """A model trained on a recall mix with a small key/value pool is asked about those ids, not the default 256."""
    from hybrid_lm.data import DataConfig
    from hybrid_lm.eval.mix import MixConfig, write_recall_mix
    from hybrid_lm.eval.tasks import RecallVocab

    mix = write_recall_mix(data_cfg, tmp_path / "mix", MixConfig(recall_fraction=0.3, tasks={"mqar": 1.0},
                                                                  min_length=32, max_length=64, pool_size=16))
    data = DataConfig(source=str(mix.source), val_fraction=mix.val_fraction, cache_dir=data_cfg.cache_dir)
    cfg = EvalConfig(**{**SMALL, "tasks": ["mqar"], "lengths": [64]})
    seen = []
    original = RecallVocab.from_tokenizer.__func__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RecallVocab, "from_tokenizer",
                   classmethod(lambda cls, *a, **k: seen.append(original(cls, *a, **k)) or seen[-1]))
        summary = evaluate(saved_model, cfg, out_dir=tmp_path / "a", data=data, progress=False)
        assert summary["settings"]["pool_size"] == 16 and len(seen[-1].keys) == 16
        summary = evaluate(saved_model, EvalConfig(**{**SMALL, "tasks": ["mqar"], "lengths": [64], "pool_size": 8}),
                           out_dir=tmp_path / "b", data=data, progress=False)  # an explicit pool wins
        assert summary["settings"]["pool_size"] == 8 and len(seen[-1].keys) == 8
    with pytest.raises(ValueError, match="pool_size"):
        EvalConfig(mqar_pairs=16, pool_size=8).validate()
