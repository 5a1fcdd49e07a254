"""The comparison recipe end to end at toy scale: mix, train two models for the same tokens, evaluate, report; a
rerun trains and evaluates nothing again."""

import sys
from pathlib import Path

import pytest
import yaml

from hybrid_lm.eval import runner
from hybrid_lm.data import prepare_data
from hybrid_lm.eval.compare import load_compare_config, prepare_mix, run_comparison

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, model_yamls, data_cfg, **changes):
    for name in ("gdn", "gdn-dsa"):
        run = {"model": str(model_yamls[name]), "dsa_stage": "sparse" if name == "gdn-dsa" else "none",
               "seq_len": 64, "batch_size": 2, "max_steps": 2, "eval_every": 1000, "eval_batches": 1,
               "log_every": 1, "save_every": 1000, "sample_tokens": 0, "optim": {"warmup_steps": 1}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(run))
    cfg = {"title": "toy comparison", "runs": {"gdn": "gdn.yaml", "gdn-dsa": "gdn-dsa.yaml"},
           "data": data_cfg.to_dict(), "mix": {"recall_fraction": 0.3, "min_length": 48, "max_length": 64},
           "train_overrides": ["device=cpu"], "out_dir": "out",
           "eval": {"lengths": [64, 128], "samples": 2, "mqar_pairs": 4, "ppl_tokens": 128, "topks": [4, 16],
                    "batch_tokens": 256}}
    cfg.update(changes)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tiny_comparison_runs_end_to_end_and_resumes(tmp_path, model_yamls, data_cfg, monkeypatch):
    cfg = load_compare_config(_write(tmp_path, model_yamls, data_cfg))
    report = run_comparison(cfg, progress=False)
    text = report.read_text()
    assert "# toy comparison" in text and "| gdn-dsa |" in text and "## MQAR accuracy" in text
    assert "## Passkey" in text and "## DSA: recall vs keys kept per query" in text
    assert "hybrids above GDN-only" in text
    assert "Every model trains on 256 tokens" in text
    for png in ("loss_vs_tokens.png", "tokens_per_s.png", "perplexity.png", "mqar.png", "passkey.png",
                "dsa_topk.png"):
        assert (report.parent / png).stat().st_size > 1000, png
    for name in ("gdn", "gdn-dsa"):
        assert (tmp_path / "out" / "runs" / name / "checkpoints" / "step_00000002").is_dir()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not be trained again")

    calls = []
    monkeypatch.setattr("hybrid_lm.training.Trainer.fit", no_training)
    original = runner._Context.compute
    monkeypatch.setattr(runner._Context, "compute", lambda self, cell: calls.append(cell) or original(self, cell))
    assert run_comparison(cfg, progress=False) == report
    assert calls == []


def test_runs_must_see_the_same_tokens(tmp_path, model_yamls, data_cfg):
    path = _write(tmp_path, model_yamls, data_cfg)
    (tmp_path / "gdn.yaml").write_text((tmp_path / "gdn.yaml").read_text().replace("max_steps: 2", "max_steps: 3"))
    with pytest.raises(ValueError, match="same|different numbers of tokens"):
        run_comparison(load_compare_config(path), progress=False)


def test_config_errors_name_the_problem(tmp_path, model_yamls, data_cfg):
    with pytest.raises(ValueError, match="does not exist"):
        load_compare_config(_write(tmp_path, model_yamls, data_cfg, runs={"x": "missing.yaml"}))
    with pytest.raises(ValueError, match="colour"):
        load_compare_config(_write(tmp_path, model_yamls, data_cfg, colour="blue"))
    mix = {"recall_fraction": 0.3, "min_length": 48, "max_length": 64, "pool_size": 16}
    evals = {"lengths": [64], "mqar_pairs": 4}
    with pytest.raises(ValueError, match="never trained on"):  # train and eval must ask about the same ids
        load_compare_config(_write(tmp_path, model_yamls, data_cfg, mix=mix, eval={**evals, "pool_size": 32}))
    with pytest.raises(ValueError, match="exceeds mix.pool_size"):
        load_compare_config(_write(tmp_path, model_yamls, data_cfg, mix=mix, eval={**evals, "mqar_pairs": 32}))
    assert load_compare_config(_write(tmp_path, model_yamls, data_cfg, mix=mix, eval=evals)).eval.pool_size is None


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu.yaml"])
def test_shipped_comparison_configs_load(name):
    cfg = load_compare_config(ROOT / "train" / "configs" / "compare" / name)
    assert set(cfg.runs) == {"dense", "gdn", "gdn-attn", "gdn-dsa"}


def test_compare_script_help():
    sys.path.insert(0, str(ROOT / "train"))
    try:
        import compare as script
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit):
        script.main(["--help"])


def test_shipped_cpu_recipe_runs_at_toy_scale(tmp_path, data_cfg):
    """The four shipped CPU run YAMLs (dense, GDN, GDN+attention, GDN+DSA) through the whole recipe, shrunk to
    2 steps on the synthetic corpus: every model trains on the same tokens, is evaluated and reported."""
    cfg = load_compare_config(ROOT / "train" / "configs" / "compare" / "cpu.yaml")
    cfg.data = data_cfg
    cfg.mix.min_length, cfg.mix.max_length = 32, 64
    cfg.train_overrides += ["max_steps=2", "seq_len=64", "batch_size=2", "eval_every=1000", "eval_batches=1",
                            "save_every=1000", "sample_tokens=0", "optim.warmup_steps=1"]
    cfg.eval = runner.EvalConfig(lengths=[64, 256], samples=2, mqar_pairs=4, ppl_tokens=128, topks=[4, 64],
                                 topk_lengths=[64], batch_tokens=512)
    cfg.out_dir = str(tmp_path / "out")
    text = run_comparison(cfg, progress=False).read_text()
    for name in ("dense", "gdn", "gdn-attn", "gdn-dsa"):
        assert f"| {name} |" in text
    assert "Every model trains on 256 tokens" in text and "hybrids above GDN-only" in text
    assert "| gdn-dsa | mqar | 64 |" in text  # the top-k sweep ran on the DSA model only


def test_a_prepared_mix_needs_no_text_corpus(tmp_path, model_yamls, data_cfg, corpus):
    """`--prepare-data` on one machine, the rest on another without the corpus: the mix folder is enough."""
    moved = tmp_path / "plays.jsonl"
    moved.write_bytes(corpus.read_bytes())
    data = {**data_cfg.to_dict(), "source": str(moved)}
    path = _write(tmp_path, model_yamls, data_cfg, data=data,
                  eval={"tasks": ["perplexity", "passkey"], "lengths": [64], "samples": 2, "ppl_tokens": 128,
                        "batch_tokens": 256})
    cfg = load_compare_config(path)
    mix = prepare_mix(cfg)
    moved.unlink()
    with pytest.raises(ValueError, match="no such file"):  # the corpus (and its cached tokenization) is gone
        prepare_data(cfg.data)
    report = run_comparison(load_compare_config(path), only=["gdn"], progress=False)
    assert mix.source.is_file() and "| gdn |" in report.read_text()


def test_ordering_check_needs_every_hybrid_well_above_gdn_only():
    from hybrid_lm.eval.report import ordering_check

    def summary(layers, accs):
        cells = [{"task": "mqar", "length": L, "topk": None, "accuracy": a} for L, a in accs.items()]
        return {"model": {"layer_types": layers}, "cells": cells}

    gdn = summary(["gated_deltanet"] * 2, {256: 0.9, 4096: 0.05})
    attn = summary(["gated_deltanet", "attention"], {256: 1.0, 4096: 0.6})
    dsa = summary(["gated_deltanet", "dsa"], {256: 1.0, 4096: 0.3})
    dense = summary(["attention"] * 2, {256: 1.0, 4096: 0.0})  # neither kind: not part of the check
    (line,) = ordering_check({"gdn": gdn, "gdn-attn": attn, "gdn-dsa": dsa, "dense": dense})
    assert "4k" in line and line.endswith("**yes**")
    dsa["cells"][1]["accuracy"] = 0.2  # only 0.15 above GDN-only: not "well above"
    assert ordering_check({"gdn": gdn, "gdn-attn": attn, "gdn-dsa": dsa})[0].endswith("**no**")
    assert "needs at least one" in ordering_check({"gdn-attn": attn})[0]
