"""Resuming continues exactly; damaged checkpoints are detected and skipped."""

import os
import re
import signal
from pathlib import Path

import torch

from hybrid_lm.training import Trainer, load_train_config, train
from hybrid_lm.training import checkpoint as ckpt_io
from hybrid_lm.training.monitor import read_metrics


def test_resume_matches_uninterrupted_run(write_config, tmp_path):
    full = train(load_train_config(write_config("full")))
    assert full.status == "done" and sorted(full.losses) == [1, 2, 3, 4, 5, 6]

    path = write_config("split")
    first = train(load_train_config(path), max_steps=3)
    assert first.status == "done" and first.step == 3
    assert first.last_checkpoint.name == "step_00000003"
    second = train(load_train_config(path), resume=True)
    assert second.status == "done" and sorted(second.losses) == [4, 5, 6]

    for step in (1, 2, 3):
        assert first.losses[step] == full.losses[step]
    for step in (4, 5, 6):
        assert second.losses[step] == full.losses[step]  # bitwise on CPU
    # the metrics file of the resumed run reads like the uninterrupted one
    train_lines = lambda run: [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train_lines(second.run_dir)] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in train_lines(second.run_dir)] == [r["lr"] for r in train_lines(full.run_dir)]
    # so do the final weights
    from safetensors.torch import load_file

    a = load_file(full.last_checkpoint / "model.safetensors")
    b = load_file(second.last_checkpoint / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


class _CtrlCOnCall(torch.nn.Module):
    """Wraps the model and sends this process SIGINT during forward call `n` (a user pressing Ctrl-C)."""

    def __init__(self, model, n):
        super().__init__()
        self.inner, self.n, self.calls = model, n, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(*args, **kwargs)


def test_ctrl_c_saves_after_the_step_and_resumes_exactly(write_config):
    full = train(load_train_config(write_config("full", max_steps=5)))
    path = write_config("interrupted", max_steps=5)
    trainer = Trainer(load_train_config(path))
    trainer.model = _CtrlCOnCall(trainer.model, n=2)
    stopped = trainer.fit()
    assert stopped.status == "stopped" and stopped.step == 2  # the step in flight completes, then it saves
    assert stopped.last_checkpoint.name == "step_00000002"
    ckpt_io.verify(stopped.last_checkpoint)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed = train(load_train_config(path), resume=True)
    assert {s: resumed.losses[s] for s in (3, 4, 5)} == {s: full.losses[s] for s in (3, 4, 5)}


def test_resume_keeps_each_sample_once(write_config):
    path = write_config("samples", max_steps=6, eval_every=2, save_every=2, sample_tokens=4)
    train(load_train_config(path), max_steps=5)  # samples at steps 2, 4 and the final 5; checkpoints 2, 4, 5
    run = load_train_config(path).out_dir
    (Path(run) / "checkpoints" / "step_00000005").rename(Path(run) / "checkpoints" / ".gone")  # resume from 4
    train(load_train_config(path), resume=True)
    steps = re.findall(r"^=== step (\d+) ===$", (Path(run) / "samples.txt").read_text(), flags=re.MULTILINE)
    assert steps == ["2", "4", "6"]


class _CtrlCOnANaNCall(_CtrlCOnCall):
    """Ctrl-C during forward call `n`, whose loss is NaN: the step it belongs to is skipped."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.calls == self.n:
            out.loss = out.loss * float("nan")
        return out


def test_ctrl_c_during_a_skipped_step_still_saves_the_last_step(write_config):
    trainer = Trainer(load_train_config(write_config("nan_stop", max_steps=5, sample_tokens=0)))
    trainer.model = _CtrlCOnANaNCall(trainer.model, n=3)
    stopped = trainer.fit()
    assert stopped.status == "stopped" and stopped.step == 2
    assert stopped.last_checkpoint is not None and stopped.last_checkpoint.name == "step_00000002"
    ckpt_io.verify(stopped.last_checkpoint)
