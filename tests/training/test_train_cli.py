"""`hybrid-lm train` / `hybrid-lm generate` as a user runs them."""

from hybrid_lm.cli import main
from hybrid_lm.training import checkpoint as ckpt_io
from hybrid_lm.training.monitor import read_metrics


def _steps(run):
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _losses(run):
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_train_resume_and_generate(write_config, tmp_path, capsys):
    path = write_config("cli", max_steps=5, sample_tokens=0)
    run = tmp_path / "cli_run"
    reference = tmp_path / "reference"
    assert main(["train", path, "--out", str(reference)]) == 0
    assert main(["train", path, "--out", str(run), "--max-steps", "2"]) == 0
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step_00000002"]
    # --max-steps stops early but keeps the config's schedule, so resuming later continues the same curve;
    # without CONFIG, --resume takes the config saved in the run
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4"]) == 0
    assert _steps(run) == [1, 2, 3, 4]
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert _steps(run) == [1, 2, 3, 4, 5]
    assert _losses(run) == _losses(reference)
    capsys.readouterr()

    args = ["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first) > len("ROMEO:\n")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded sampling
    assert main(["generate", str(run / "checkpoints" / "step_00000005"), "--temperature", "0",
                 "--max-new-tokens", "4"]) == 0


def test_user_errors_exit_2_with_a_message(write_config, tmp_path, capsys):
    path = write_config("errors", max_steps=1, sample_tokens=0)
    assert main(["train", path, "--set", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["train", path]) == 0
    capsys.readouterr()
    assert main(["train", path]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
