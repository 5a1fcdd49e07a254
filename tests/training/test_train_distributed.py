"""Two CPU processes over gloo (DDP and FSDP2) follow the single-process run with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import hybrid_lm
from hybrid_lm.training import load_train_config, train
from hybrid_lm.training.monitor import read_metrics

REPO = Path(hybrid_lm.__file__).resolve().parents[1]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(write_config, tmp_path, parallel):
    # an eval right before each save: FSDP2 must reshard after the eval's no-grad forward, or the save fails
    settings = dict(max_steps=4, save_every=2, eval_every=2, sample_tokens=4)
    path = write_config(parallel, parallel=parallel, **settings)
    reference = train(load_train_config(write_config("single", **settings)))
    out = tmp_path / "two_ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train" / "pretrain.py"), path, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = _losses(out)
    assert sorted(two) == [1, 2, 3, 4]
    for step, loss in reference.losses.items():
        assert two[step] == pytest.approx(loss, abs=1e-5), step
    evals = [r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] == pytest.approx(reference.eval_loss, abs=1e-5)
    # rank 0 wrote one complete checkpoint per save, loadable without any process group
    model = hybrid_lm.load_model(out)
    assert model.config.name == "tiny-test"
