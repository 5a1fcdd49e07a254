"""The zoo replicas train with the shipped recipes: DeepSeek-V3.2 (MLA + DSA in every layer, DeepSeekMoE with bias
balancing) and Qwen3-Next (GDN + gated attention, softmax MoE with an aux balance loss), shrunk to a tiny corpus."""

from pathlib import Path

import torch

import hybrid_lm
from hybrid_lm.cli import main
from hybrid_lm.training import Trainer, load_train_config
from hybrid_lm.training.monitor import read_metrics

REPO = Path(hybrid_lm.__file__).resolve().parents[1]


def _shipped(name, tmp_path, corpus, data_cache, *extra):
    """The shipped training YAML for a zoo model on the test corpus: 8 short steps."""
    overrides = [f"data.source={corpus}", f"data.cache_dir={data_cache}", "data.vocab_size=300",
                 "data.val_fraction=0.1", "seq_len=32", "batch_size=4", "max_steps=8", "optim.warmup_steps=2",
                 "log_every=1", "eval_every=1000", "eval_batches=1", "save_every=1000", "sample_tokens=0",
                 f"out_dir={tmp_path / name}", *extra]
    return load_train_config(REPO / "train" / "configs" / f"{name}.yaml", overrides)


def _train(cfg):
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.raw.named_parameters()}
    buffers = {n: b.clone() for n, b in trainer.raw.named_buffers()}
    result = trainer.fit()
    records = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    losses = [r["lm_loss"] for r in records]
    assert result.status == "done" and len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.5, losses  # ln(300) = 5.7 at the start
    moved = {n for n, p in trainer.raw.named_parameters() if not torch.equal(before[n], p.detach())}
    moved_buffers = {n for n, b in trainer.raw.named_buffers() if not torch.equal(buffers[n], b)}
    return trainer, records, moved, moved_buffers


def test_deepseek_v32_tiny_trains_with_sparse_attention(tmp_path, corpus, data_cache):
    cfg = _shipped("deepseek-v32-tiny", tmp_path, corpus, data_cache,
                   "model_overrides.mixers.dsa.index_topk=8")  # well below seq_len: selection matters
    assert cfg.model == "deepseek-v32-tiny" and cfg.dsa_stage == "sparse"
    trainer, records, moved, moved_buffers = _train(cfg)
    assert trainer.raw.config.layer_types == ["dsa"] * 4 and trainer.raw.config.mixers["dsa"].q_lora_rank
    assert moved == {n for n, _ in trainer.raw.named_parameters()}  # indexers, MLA, experts, router: all train
    assert any("bias" in n for n in moved_buffers)  # bias balancing moved the routing biases
    for i in range(4):
        assert {f"dsa/layer{i}/kl", f"dsa/layer{i}/recall"} <= set(records[-1]["metrics"])
        assert 0 < records[-1]["metrics"][f"dsa/layer{i}/recall"] <= 1
    assert all(r["aux_loss"] > 0 for r in records)  # the indexer KL


def test_qwen3_next_tiny_trains_with_moe_balance_loss(tmp_path, corpus, data_cache):
    cfg = _shipped("qwen3-next-tiny", tmp_path, corpus, data_cache)
    assert cfg.dsa_stage == "none"
    trainer, records, moved, _ = _train(cfg)
    assert trainer.raw.config.layer_types.count("gated_deltanet") == 3
    assert moved == {n for n, _ in trainer.raw.named_parameters()}
    assert all(r["aux_loss"] > 0 for r in records)  # the MoE balance loss is optimised
    assert any(k.endswith("/max_load") for k in records[-1]["metrics"])


def test_set_model_takes_a_zoo_name(write_config, tmp_path, capsys):
    path = write_config("zoo", max_steps=1, sample_tokens=0, eval_batches=0)
    cfg = load_train_config(path, ["model=qwen3-next-tiny", "dsa_stage=none"])
    assert cfg.model == "qwen3-next-tiny"
    assert Trainer(cfg).raw.config.name == "qwen3-next-tiny"
    # the default recipe trains DSA layers (dsa_stage: sparse); a model without them gets told what to change
    assert main(["train", path, "--set", "model=qwen3-next-tiny", "--out", str(tmp_path / "x")]) == 2
    assert "dsa_stage=none" in capsys.readouterr().err
    assert main(["train", path, "--set", "model=no-such-model", "--out", str(tmp_path / "y")]) == 2
    assert "zoo names" in capsys.readouterr().err


def test_samples_and_evals_leave_moe_bias_balancing_alone(tmp_path, corpus, data_cache):
    # generated tokens must not count as training load: the pending loads would move the expert biases at the
    # next step, and a run resumed from a checkpoint (which does not hold them) would then diverge
    trainer = Trainer(_shipped("deepseek-v32-tiny", tmp_path, corpus, data_cache, "sample_tokens=6"))
    moe = [m for m in trainer.raw.modules() if hasattr(m, "_pending_load")]
    assert moe
    trainer.sample()
    trainer.evaluate()
    assert all(m._pending_load is None for m in moe)
    assert trainer.raw.training
