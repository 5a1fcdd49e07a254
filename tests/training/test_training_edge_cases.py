"""Edge cases of resuming and configuring a run that the main trainer tests do not reach."""

import torch

from hybrid_lm.training import Trainer, load_train_config, train


def test_resume_applies_the_configs_optimizer_settings_not_the_checkpoints(write_config):
    path = write_config("resume_optim", sample_tokens=0, eval_batches=0)
    train(load_train_config(path), max_steps=2)
    changed = load_train_config(path, ["optim.weight_decay=0.0", "optim.betas=[0.5, 0.6]", "optim.eps=1e-3"])
    trainer = Trainer(changed, resume=True)
    assert trainer.step == 2
    for group in trainer.optimizer.param_groups:  # a --set on resume is not silently overruled by the checkpoint
        assert group["weight_decay"] == 0.0 and tuple(group["betas"]) == (0.5, 0.6) and group["eps"] == 1e-3
    assert trainer.optimizer.state  # while the Adam moments do carry over


def test_resume_without_config_finds_the_run_named_by_set_out_dir(write_config, tmp_path, monkeypatch):
    import argparse

    from hybrid_lm.cli import _train_config

    path = write_config("set_out", sample_tokens=0, eval_batches=0, seq_len=24)
    run = tmp_path / "set_out_run"
    train(load_train_config(path, [f"out_dir={run}"]), max_steps=1)
    monkeypatch.chdir(tmp_path)  # no runs/default here
    args = argparse.Namespace(config=None, out=None, resume=True, set=[f"out_dir={run}"], max_steps=None)
    cfg = _train_config(args)
    # the config saved in that run, not train/configs/default.yaml (Shakespeare, seq_len 256) pointed at it
    assert cfg.out_dir == str(run) and cfg.seq_len == 24 and cfg.data.source == load_train_config(path).data.source


def test_relative_set_paths_survive_the_config_a_checkpoint_saves(write_config, tmp_path, monkeypatch):
    from hybrid_lm.training.config import dump_train_config

    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(write_config("rel"), ["data.source=plays.jsonl", "init_from=runs/warmup",
                                                  "model=null", "data={source: other.jsonl, tokenizer: tok.json}"])
    assert cfg.init_from == str(tmp_path / "runs" / "warmup")  # relative to the working directory
    assert cfg.data.source == str(tmp_path / "other.jsonl") and cfg.data.tokenizer == str(tmp_path / "tok.json")
    saved = tmp_path / "runs" / "x" / "checkpoints" / "step_00000001" / "train_config.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text(dump_train_config(cfg))
    again = load_train_config(saved)  # what `hybrid-lm train --resume --out runs/x` reads back
    assert (again.init_from, again.data.source, again.data.tokenizer) == (
        cfg.init_from, cfg.data.source, cfg.data.tokenizer)
    named = load_train_config(write_config("named"), ["data.source=shakespeare", "model=tiny-hybrid"])
    assert named.data.source == "shakespeare" and named.model == "tiny-hybrid"  # names stay names


def test_resuming_a_warmup_run_as_sparse_says_to_start_a_new_run(write_config):
    import pytest

    path = write_config("warm", dsa_stage="dense_warmup", sample_tokens=0, eval_batches=0)
    train(load_train_config(path), max_steps=1)
    with pytest.raises(ValueError) as err:  # was torch's "Missing optimizer state for parameter ..."
        Trainer(load_train_config(path, ["dsa_stage=sparse"]), resume=True)
    for words in ("dsa_stage: dense_warmup", "dsa_stage: sparse", "init_from: ", "step_00000001"):
        assert words in str(err.value)


def test_set_text_settings_keep_text_that_yaml_would_read_as_something_else(write_config):
    cfg = load_train_config(write_config("text"), ["sample_prompt=JULIET:", "data.text_field=yes", "model=null",
                                                   "init_from=null", "model=tiny-hybrid"])
    assert cfg.sample_prompt == "JULIET:"  # was the mapping {'JULIET': None}: "must be a string"
    assert cfg.data.text_field == "yes" and cfg.model == "tiny-hybrid" and cfg.init_from is None
    assert load_train_config(write_config("text2"), ["sample_prompt=KING: hark"]).sample_prompt == "KING: hark"


def test_tensorboard_hides_the_points_a_resumed_run_logs_again(tmp_path, monkeypatch):
    import sys
    import types

    from hybrid_lm.training.monitor import Monitor

    opened = []

    class _Writer:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)
        def __init__(self, log_dir, **kwargs):
            opened.append(kwargs)

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_Writer))
    Monitor(tmp_path, 40, None, "resumed").close()
    Monitor(tmp_path, None, None, "fresh").close()
    # without purge_step TensorBoard showed the old run's steps 41+ next to the resumed run's
    assert [o.get("purge_step") for o in opened] == [41, 0]


def test_resume_applies_model_overrides_that_keep_the_shapes(write_config):
    path = write_config("resume_topk", sample_tokens=0, eval_batches=0, model_overrides={"hidden_size": 48})
    first = train(load_train_config(path), max_steps=1)
    trainer = Trainer(load_train_config(path, ["model_overrides.mixers.dsa.index_topk=4"]), resume=True)
    assert trainer.raw.config.mixers["dsa"].index_topk == 4  # was silently the checkpoint's 8
    assert trainer.raw.config.hidden_size == 48  # the run's own overrides apply again, unchanged
    from safetensors.torch import load_file

    saved = load_file(first.last_checkpoint / "model.safetensors")
    for name, p in trainer.raw.state_dict().items():
        if name in saved:
            assert torch.equal(p, saved[name]), name


def test_resuming_a_stage_run_after_its_init_from_run_is_gone(write_config):
    import shutil

    from hybrid_lm.training import checkpoint as ckpt_io

    warm = train(load_train_config(write_config("stage1", sample_tokens=0, eval_batches=0)), max_steps=1)
    path = write_config("stage2", model=None, init_from=str(warm.run_dir), sample_tokens=0, eval_batches=0)
    first = train(load_train_config(path), max_steps=1)
    shutil.rmtree(warm.run_dir)  # or pruned since: the tokenizer the saved config named lived in its checkpoint
    saved = load_train_config(ckpt_io.find_latest_valid(first.run_dir) / "train_config.yaml")
    second = train(saved, resume=True, max_steps=2)  # `hybrid-lm train --resume --out RUN`
    assert second.status == "done" and sorted(second.losses) == [2]


def test_a_skipped_step_leaves_no_moe_loads_for_the_next_bias_update(write_config):
    """Bias balancing (DeepSeek-V3) moves each expert's bias from the loads since the last update; a step skipped
    for a non-finite loss is not an update, so its forward's loads are dropped, not added to the next step's."""
    from hybrid_lm.layers.moe import MoE

    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "balancing": "bias",
           "bias_update_rate": 0.01}
    trainer = Trainer(load_train_config(write_config("moe-skip", max_steps=2, sample_tokens=0,
                                                     model_overrides={"moe": moe})))
    layers = [m for m in trainer.raw.modules() if isinstance(m, MoE)]
    assert layers
    seen = []

    class NaNFirst(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner, self.calls = model, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            seen.append([m._pending_load is None for m in layers])  # before this step's forward
            out = self.inner(*args, **kwargs)
            if self.calls == 1:
                out.loss = out.loss * float("nan")
            return out

    trainer.model = NaNFirst(trainer.model)
    result = trainer.fit()
    assert result.status == "done" and sorted(result.losses) == [1, 2]
    assert seen[1] == [True] * len(layers)  # the skipped step's loads were dropped
