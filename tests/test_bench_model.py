"""benchmarks/bench_model.py's CPU smoke mode: a training step of the tiny hybrid is timed, its FLOPs and MFU follow
the formula of the script's docstring, `--activation-checkpointing` and `--set` reach the model and name the row,
and failing or over-budget rows are recorded instead of ending the run."""

import json
from pathlib import Path

import pytest

import torch

import hybrid_lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_model")


def test_tiny_cpu_run_measures_and_records_failures(bench, tmp_path):
    out = tmp_path / "model.json"
    bench.main(["--device", "cpu", "--tiny", "--T", "32", "4096", "--peak-tflops", "0.5", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["op"], r["T"]) for r in rows] == [("tiny-hybrid", 32), ("tiny-hybrid", 4096)]
    ok, too_long = rows
    assert ok["impl"] == "train-bf16-sparse" and ok["B"] == 2 and ok.get("note") is None  # 64 tokens a step
    assert ok["lm_loss"] == "chunked" and ok["activation_checkpointing"] is False
    assert ok["fwdbwd_ms"] > 0 and ok["fwd_ms"] > 0 and ok["card"].startswith("cpu")
    model = hybrid_lm.build_model(hybrid_lm.load_config(ROOT / "model_configs" / "tiny-hybrid.yaml"),
                                  device="meta")
    assert ok["train_gflops_per_token"] == pytest.approx(3 * model.flops_per_token(32) / 1e9)
    assert ok["tokens_per_s"] == pytest.approx(64 / (ok["fwdbwd_ms"] / 1e3))
    assert ok["tflops"] == pytest.approx(ok["tokens_per_s"] * ok["train_gflops_per_token"] / 1e3)
    assert ok["mfu"] == pytest.approx(ok["tflops"] / 0.5)
    assert too_long["impl"] == "error" and "max_position_embeddings = 2048" in too_long["note"]


def test_activation_checkpointing_flag_names_the_row_and_reaches_the_model(bench, tmp_path, monkeypatch):
    seen = []
    original = hybrid_lm.HybridLM.set_activation_checkpointing
    monkeypatch.setattr(hybrid_lm.HybridLM, "set_activation_checkpointing",
                        lambda self, on=True: seen.append(on) or original(self, on))
    forward, logits = hybrid_lm.HybridLM.forward, set()
    monkeypatch.setattr(hybrid_lm.HybridLM, "forward",
                        lambda self, *a, **k: logits.add(k.get("return_logits", True)) or forward(self, *a, **k))
    out = tmp_path / "model.json"
    bench.main(["--device", "cpu", "--tiny", "--T", "32", "--activation-checkpointing", "--out", str(out)])
    (r,) = json.loads(out.read_text())
    assert r["impl"] == "train-bf16-sparse-ckpt" and r["activation_checkpointing"] is True and r.get("note") is None
    assert r["lm_loss"] == "chunked" and r["fwdbwd_ms"] > 0 and seen == [True]
    assert logits == {False}  # the step and the forward alone both take the chunked loss, as the trainer does
    bench.main(["--device", "cpu", "--tiny", "--T", "32", "--activation-checkpointing", "1", "--out", str(out)])
    (r,) = json.loads(out.read_text())
    assert r["impl"] == "train-bf16-sparse-ckpt1" and seen == [True, 1] and type(seen[1]) is int  # not True
    assert type(r["activation_checkpointing"]) is int and r["activation_checkpointing"] == 1
    bench.main(["--device", "cpu", "--tiny", "--T", "32", "--activation-checkpointing", "0", "--out", str(out)])
    (r,) = json.loads(out.read_text())
    assert r["impl"] == "train-bf16-sparse" and seen[2] == 0  # nothing checkpointed, nothing in the name
    with pytest.raises(SystemExit, match="only on CUDA"):  # no autocast on the CPU: a bf16 stream would be a no-op
        bench.main(["--device", "cpu", "--tiny", "--residual-dtype", "bf16", "--out", str(out)])


def test_set_overrides_the_model_config_and_names_the_row(bench, tmp_path, monkeypatch):
    built = []
    original = hybrid_lm.build_model
    monkeypatch.setattr(hybrid_lm, "build_model", lambda cfg, **k: built.append(cfg) or original(cfg, **k))
    out = tmp_path / "model.json"
    bench.main(["--device", "cpu", "--tiny", "--T", "32", "--set", "num_key_value_heads=1",
                "--set", "mixers.dsa.index_topk=8", "--out", str(out)])
    (r,) = json.loads(out.read_text())
    assert r["impl"] == "train-bf16-sparse-num_key_value_heads=1-mixers.dsa.index_topk=8" and r.get("note") is None
    assert r["overrides"] == ["num_key_value_heads=1", "mixers.dsa.index_topk=8"]
    (cfg,) = built
    assert cfg.num_key_value_heads == 1 and cfg.mixers["dsa"].index_topk == 8
    with pytest.raises(ValueError, match="mixers.<type>.<key>"):
        bench.model_overrides(["mixers.dsa=1"])
    bench.main(["--device", "cpu", "--tiny", "--T", "32", "--set", "num_key_value_heads=4", "--out", str(out)])
    (bad,) = json.loads(out.read_text())  # 6 heads do not split into 4 groups: the row records the config's error
    assert bad["impl"] == "error" and "num_key_value_heads" in bad["note"]


def test_cast_per_projection_times_the_old_blocks_and_restores_them(bench, tmp_path, monkeypatch):
    import hybrid_lm.model.block as block

    cast_once, patched = block.matmul_dtype, []
    forward = hybrid_lm.HybridLM.forward
    monkeypatch.setattr(hybrid_lm.HybridLM, "forward",
                        lambda self, *a, **k: patched.append(block.matmul_dtype is not cast_once)
                        or forward(self, *a, **k))
    out = tmp_path / "model.json"
    bench.main(["--device", "cpu", "--tiny", "--T", "32", "--cast-per-projection", "--out", str(out)])
    (r,) = json.loads(out.read_text())
    assert r["impl"] == "train-bf16-sparse-cast-per-projection" and r.get("note") is None
    assert patched and all(patched)  # every step ran the old blocks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block.matmul_dtype(torch.zeros(1)) == torch.bfloat16  # and the run put the norms' cast back
    assert block.matmul_dtype is cast_once


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


def test_profile_keeps_the_costliest_kernels_of_a_step(bench, tmp_path):
    out = tmp_path / "model.json"
    bench.main(["--device", "cpu", "--tiny", "--T", "32", "--profile", "4", "--out", str(out)])
    (r,) = json.loads(out.read_text())
    names, ms, shares = zip(*r["profile"])
    assert len(names) == 4 and list(ms) == sorted(ms, reverse=True) and all(0 < s <= 1 for s in shares)
    assert any("mm" in n for n in names)  # a training step's time goes to matrix products first


@pytest.fixture(scope="module")
def targets(load_benchmark):
    return load_benchmark("targets")


def test_targets_compare_within_one_file_and_say_by_how_much(targets, tmp_path):
    meta = dict(card="GPU X", date="2026-12-06")
    layer = [dict(op="dense_attention", impl="flash-attn-4", T=65536, fwdbwd_ms=100.0, **meta),
             dict(op="dsa", impl="triton-hkv1", T=65536, fwdbwd_ms=50.0, peak_mem_gb=4.0, **meta),
             dict(op="dense_attention", impl="flash-attn-4", T=16384, fwdbwd_ms=6.0, **meta),
             dict(op="dsa", impl="triton-hkv1", T=16384, fwdbwd_ms=3.0, **meta),
             dict(op="dsa_indexer_topk", impl="triton", T=65536, fwd_ms=10.0, **meta),
             dict(op="dsa_indexer_topk", impl="triton-torch.topk", T=65536, fwd_ms=20.0, **meta)]
    model = [dict(op="dense-350m", impl="train-bf16-none", T=32768, tokens_per_s=1000.0, **meta),
             dict(op="gdn-dsa-350m", impl="train-bf16-sparse", T=32768, tokens_per_s=3000.0, **meta),
             dict(op="dense-125m", impl="train-bf16-none", T=4096, mfu=0.175, **meta)]
    paths = []
    for name, rows in (("layer.json", layer), ("model.json", model)):
        (tmp_path / name).write_text(json.dumps(rows))
        paths.append(str(tmp_path / name))
    # a baseline from another file (another run) is never used: only the model file's flash-attn-4 row here
    (tmp_path / "other.json").write_text(json.dumps([dict(op="dsa", impl="triton-hkv1", T=131072, fwdbwd_ms=1.0)]))
    rows = targets.main(paths + [str(tmp_path / "other.json"), "--out", str(tmp_path / "t.json")])
    got = {(r["impl"], r["T"]): r for r in rows}
    at64 = got[("dsa_vs_flash_attn_4", 65536)]
    assert at64["measured"] == 2.0 and at64["met"] is False and at64["miss_factor"] == 2.5 and at64["why"]
    assert got[("dsa_vs_flash_attn_4", 16384)]["met"] is True and got[("dsa_vs_flash_attn_4", 16384)]["why"] is None
    assert ("dsa_vs_flash_attn_4", 131072) not in got
    assert got[("topk_vs_torch_topk", 65536)]["measured"] == 2.0
    assert got[("gdn_dsa_350m_vs_dense_32k", 32768)]["met"] is True
    assert got[("mfu_4k", 4096)]["miss_factor"] == pytest.approx(2.0) and got[("mfu_4k", 4096)]["config"] == "dense-125m"
    assert got[("sparse_fwd_tflops", None)]["note"].startswith("not measured")
    assert json.loads((tmp_path / "t.json").read_text()) == rows
