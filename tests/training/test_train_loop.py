"""The training loop: DSA stages train the right parameters, accumulation is exact, non-finite losses are skipped,
and a run leaves metrics, a plot, samples and verifiable checkpoints behind."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from hybrid_lm.eval.masked import MaskedBatches
from hybrid_lm.training import Trainer, load_train_config, train
from hybrid_lm.training.build import num_predictions
from hybrid_lm.training import checkpoint as ckpt_io
from hybrid_lm.training.monitor import dsa_series, plot_dsa, read_metrics


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse", "none"])
def test_dsa_stage_trains_the_right_parameters(write_config, stage):
    trainer = Trainer(load_train_config(write_config(stage, dsa_stage=stage, max_steps=2, sample_tokens=0)))
    before = _snapshot(trainer.raw)
    result = trainer.fit()
    changed = _changed(before, trainer.raw)
    indexer = {n for n, _ in trainer.raw.named_parameters() if ".indexer." in n}
    assert indexer
    if stage == "dense_warmup":
        assert changed == indexer
    elif stage == "sparse":
        assert changed == set(before)
    else:
        assert changed == set(before) - indexer
    records = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    for r in records:
        expected = {"dense_warmup": r["aux_loss"], "sparse": r["lm_loss"] + r["aux_loss"], "none": r["lm_loss"]}
        assert r["loss"] == pytest.approx(expected[stage])
        assert r["lm_loss"] > 0
        if stage != "none":
            assert {"dsa/layer1/kl", "dsa/layer1/recall"} <= set(r["metrics"])
            assert r["aux_loss"] > 0


def test_gradient_accumulation_matches_a_big_batch(write_config):
    big = train(load_train_config(write_config("big", batch_size=4, grad_accum=1, max_steps=3)))
    small = train(load_train_config(write_config("acc", batch_size=2, grad_accum=2, max_steps=3)))
    for step in (1, 2, 3):
        assert small.losses[step] == pytest.approx(big.losses[step], rel=1e-5)


@pytest.mark.filterwarnings("ignore:dsa_stage. none leaves the DSA indexers untrained")  # the LM loss alone
def test_masked_labels_weigh_the_same_however_a_step_is_split(write_config):
    # answers-only labels (-100 elsewhere), with a stretch where whole micro-batches score nothing: the step's loss
    # and update are the mean over its scored targets, whatever the micro-batch split
    def first_step(batch_size, grad_accum):
        trainer = Trainer(load_train_config(write_config(f"m{grad_accum}", batch_size=batch_size,
                                                         grad_accum=grad_accum, dsa_stage="none")))
        mask = (np.random.default_rng(0).random(len(trainer.prepared.train)) < 0.5).astype(np.uint8)
        mask[:1000] = 0
        trainer.batches = MaskedBatches(trainer.batches, mask)
        stats = trainer._train_step()
        assert stats is not None, (batch_size, grad_accum)  # not skipped as non-finite
        return stats["lm_loss"], stats["grad_norm"]

    whole = first_step(4, 1)
    for split in ((2, 2), (1, 4)):
        assert first_step(*split) == pytest.approx(whole, rel=1e-5), split


def test_a_held_out_split_shorter_than_seq_len_warns_that_evals_are_skipped(write_config):
    with pytest.warns(UserWarning, match="fewer than seq_len = 4096: evals are skipped"):
        Trainer(load_train_config(write_config("short_val", seq_len=4096, batch_size=1, max_steps=1,
                                               model_overrides={"max_position_embeddings": 4096})))


def test_num_predictions_counts_only_scored_targets():
    ids = torch.arange(10)[None]
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    assert num_predictions({"input_ids": ids, "labels": ids, "cu_seqlens": cu}) == 8  # 10 tokens, 2 documents
    labels = ids.clone()
    labels[0, 5:8] = -100
    assert num_predictions({"input_ids": ids, "labels": labels, "cu_seqlens": cu}) == 5
    assert num_predictions({"input_ids": ids, "labels": torch.full_like(ids, -100), "cu_seqlens": cu}) == 0


def test_activation_checkpointing_trains_the_same_run(write_config):
    plain = train(load_train_config(write_config("plain", max_steps=3, sample_tokens=0)))
    for on in (True, 1):  # every block, or only the first one
        trainer = Trainer(load_train_config(write_config(f"ckpt-{on}", max_steps=3, sample_tokens=0,
                                                         activation_checkpointing=on)))
        assert trainer.raw.activation_checkpointing is on and trainer.raw.checkpointed_blocks() == (
            len(trainer.raw.layers) if on is True else 1)
        ckpt = trainer.fit()
        for step in (1, 2, 3):
            assert ckpt.losses[step] == pytest.approx(plain.losses[step], rel=1e-6)
        assert ckpt.eval_loss == pytest.approx(plain.eval_loss, rel=1e-6)
    many = load_train_config(write_config("ckpt-many", max_steps=1, activation_checkpointing=99))
    with pytest.raises(ValueError, match="activation_checkpointing = 99.*from 0 to num_hidden_layers"):
        Trainer(many)


def test_a_bf16_residual_stream_trains_under_bf16_autocast(write_config):
    trainer = Trainer(load_train_config(write_config("bf16-residual", max_steps=2, sample_tokens=0, dtype="bf16",
                                                     residual_dtype="bf16")))
    assert trainer.raw.residual_dtype == torch.bfloat16
    result = trainer.fit()
    assert all(math.isfinite(result.losses[step]) for step in (1, 2))
    on_cpu = load_train_config(write_config("bf16-residual-auto", max_steps=1, residual_dtype="bf16",
                                            device="cpu"))  # dtype auto: no autocast on a CPU
    with pytest.raises(ValueError, match="residual_dtype: bf16 needs bf16 autocast"):
        Trainer(on_cpu)


class _NaNOnCalls(nn.Module):
    """Wraps the model; the forward calls numbered in `bad` return a NaN loss."""

    def __init__(self, model, bad):
        super().__init__()
        self.inner, self.bad, self.calls = model, set(bad), 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        out = self.inner(*args, **kwargs)
        if self.calls in self.bad:
            out.loss = out.loss * float("nan")
        return out


def test_nonfinite_loss_skips_the_update(write_config):
    trainer = Trainer(load_train_config(write_config("skip", max_steps=4, sample_tokens=0)))
    trainer.model = _NaNOnCalls(trainer.model, bad={2})
    result = trainer.fit()
    assert result.status == "done" and sorted(result.losses) == [1, 2, 3, 4]
    assert trainer.model.calls == 5  # one extra batch for the skipped step


def test_repeated_nonfinite_losses_stop_and_name_the_last_checkpoint(write_config):
    trainer = Trainer(load_train_config(write_config("nan", max_steps=6, save_every=2, max_nonfinite=3,
                                                     sample_tokens=0)))
    trainer.model = _NaNOnCalls(trainer.model, bad=range(3, 100))
    result = trainer.fit()
    assert result.status == "nonfinite" and result.step == 2
    assert "3 non-finite losses" in result.message and "step_00000002" in result.message
    saved = ckpt_io.list_checkpoints(result.run_dir)
    assert [p.name for p in saved] == ["step_00000002"]
    from safetensors.torch import load_file

    weights = load_file(saved[0] / "model.safetensors")
    for name, p in trainer.raw.named_parameters():  # no NaN update reached the weights
        if name in weights:
            assert torch.equal(weights[name], p.detach())


def test_run_outputs(write_config):
    result = train(load_train_config(write_config("out", max_steps=4, eval_every=2, log_every=2, save_every=2,
                                                  keep_last=1)))
    run = result.run_dir
    records = read_metrics(run / "metrics.jsonl")
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4] and [r["step"] for r in eval_lines] == [2, 4]
    assert {"step", "loss", "lm_loss", "aux_loss", "lr", "tokens", "tokens_per_s", "grad_norm", "metrics"} <= \
        set(train_lines[0])
    assert train_lines[-1]["tokens"] == 4 * 4 * 32
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "dsa.png").stat().st_size > 1000  # the model has a DSA layer: its KL and recall
    samples = (run / "samples.txt").read_text()
    assert samples.count("=== step") == 2 and "ROMEO:" in samples
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step_00000004"]  # keep_last: 1
    ckpt = result.last_checkpoint
    ckpt_io.verify(ckpt)
    for name in ("model.safetensors", "config.yaml", "optimizer.pt", "trainer_state.pt", "train_config.yaml",
                 "tokenizer.json", "tokenizer_config.json", "manifest.json"):
        assert (ckpt / name).is_file(), name
    assert not list((run / "checkpoints").glob(".tmp*"))
    assert load_train_config(ckpt / "train_config.yaml").max_steps == 4


def test_resume_skips_a_damaged_checkpoint(write_config):
    path = write_config("damaged", max_steps=6, save_every=2, keep_last=3)
    full = train(load_train_config(write_config("reference", max_steps=6)))
    first = train(load_train_config(path), max_steps=4)
    newest = first.last_checkpoint
    assert newest.name == "step_00000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # a crash or a full disk cut the file short
    with pytest.raises(ValueError, match="model.safetensors"):
        ckpt_io.verify(newest)
    with pytest.warns(UserWarning, match="step_00000004"):
        second = train(load_train_config(path), resume=True)
    assert sorted(second.losses) == [3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert second.losses[step] == full.losses[step]
    ckpt_io.verify(second.run_dir / "checkpoints" / "step_00000004")  # rewritten intact
    steps = [r["step"] for r in read_metrics(second.run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_fresh_run_refuses_to_overwrite_checkpoints(write_config):
    path = write_config("twice", max_steps=1, sample_tokens=0)
    train(load_train_config(path))
    with pytest.raises(ValueError, match="--resume"):
        train(load_train_config(path))


def test_metrics_are_json_lines(write_config):
    result = train(load_train_config(write_config("json", max_steps=2, sample_tokens=0)))
    for line in (result.run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_run_and_resume(write_config):
    path = write_config("cuda", device="cuda", max_steps=4, save_every=2, eval_every=2)
    first = train(load_train_config(path), max_steps=2)
    trainer = Trainer(load_train_config(path), resume=True)
    assert trainer.device.type == "cuda" and trainer.step == 2
    assert trainer.optimizer.defaults["fused"] is True
    second = trainer.fit()
    assert first.status == "done" and second.status == "done"
    assert all(torch.isfinite(torch.tensor(v)) for v in second.losses.values())
    assert second.eval_loss is not None and second.eval_loss < 6.0


def test_dsa_series_and_stage_plot(tmp_path):
    def rec(step, kl, recall):
        return {"step": step, "loss": 1.0, "metrics": {"dsa/layer10/kl": kl, "dsa/layer2/kl": kl * 2,
                                                       "dsa/layer2/recall": recall, "moe/layer1/max_load": 3.0}}

    warm = [rec(5, 1.0, 0.5), rec(10, 0.5, 0.7), {"step": 10, "eval_loss": 4.0}]
    series = dsa_series(warm)
    assert list(series) == ["layer2", "layer10"]  # numeric order; other metrics and eval lines ignored
    assert series["layer2"] == {"kl": [(5, 2.0), (10, 1.0)], "recall": [(5, 0.5), (10, 0.7)]}
    assert series["layer10"]["recall"] == []
    path = tmp_path / "dsa.png"
    plot_dsa([("warm-up", warm), ("sparse", [rec(5, 0.2, 0.8)])], path, "two stages")
    assert path.stat().st_size > 1000
