"""benchmarks/bench_model.py's CPU smoke mode: a training step of the tiny hybrid is timed, its FLOPs and MFU follow
the formula of the script's docstring, and failing or over-budget rows are recorded instead of ending the run."""

import importlib.util
import json
from pathlib import Path

import pytest

import hybrid_lm

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_measures_and_records_failures(bench, tmp_path):
    out = tmp_path / "model.json"
    bench.main(["--device", "cpu", "--tiny", "--T", "32", "4096", "--peak-tflops", "0.5", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["op"], r["T"]) for r in rows] == [("tiny-hybrid", 32), ("tiny-hybrid", 4096)]
    ok, too_long = rows
    assert ok["impl"] == "train-bf16-sparse" and ok["B"] == 2 and ok.get("note") is None  # 64 tokens a step
    assert ok["fwdbwd_ms"] > 0 and ok["fwd_ms"] > 0 and ok["card"].startswith("cpu")
    model = hybrid_lm.build_model(hybrid_lm.load_config(SCRIPT.parents[1] / "model_configs" / "tiny-hybrid.yaml"),
                                  device="meta")
    assert ok["train_gflops_per_token"] == pytest.approx(3 * model.flops_per_token(32) / 1e9)
    assert ok["tokens_per_s"] == pytest.approx(64 / (ok["fwdbwd_ms"] / 1e3))
    assert ok["tflops"] == pytest.approx(ok["tokens_per_s"] * ok["train_gflops_per_token"] / 1e3)
    assert ok["mfu"] == pytest.approx(ok["tflops"] / 0.5)
    assert too_long["impl"] == "error" and "max_position_embeddings = 2048" in too_long["note"]


def test_rows_past_the_time_budget_are_skipped(bench, tmp_path):
    out = tmp_path / "model.json"
    bench.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["skipped", "skipped"] and "budget" in rows[0]["note"]


def test_peak_tflops_follow_the_card_name(bench, monkeypatch):
    import torch

    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Some New GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert bench.peak_tflops_of(torch.device("cuda"), None) == peak
    assert bench.peak_tflops_of(torch.device("cpu"), 3.0) == 3.0
