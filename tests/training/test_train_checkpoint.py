"""Checkpoint files: atomic writes, manifests that catch truncation and corruption, pruning, RNG round trips."""

import json
import random

import numpy as np
import pytest
import torch

from hybrid_lm.training import checkpoint as ckpt_io
from hybrid_lm.utils.files import MANIFEST_NAME, atomic_write_bytes, verify_manifest, write_manifest


def _folder(tmp_path, name="ckpt"):
    d = tmp_path / name
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(bytes(range(256)) * 4)
    (d / "sub" / "b.txt").write_text("hello")
    return d


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_manifest_accepts_intact_folder(tmp_path):
    d = _folder(tmp_path)
    write_manifest(d)
    files = json.loads((d / MANIFEST_NAME).read_text())["files"]
    assert sorted(files) == ["a.bin", "sub/b.txt"]
    verify_manifest(d)


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "a.bin").write_bytes((d / "a.bin").read_bytes()[:100]), ("a.bin", "truncated")),
    (lambda d: (d / "a.bin").write_bytes(b"\xff" + (d / "a.bin").read_bytes()[1:]), ("a.bin", "corrupted")),
    (lambda d: (d / "sub" / "b.txt").unlink(), ("b.txt", "missing")),
    (lambda d: (d / MANIFEST_NAME).unlink(), (MANIFEST_NAME,)),
    (lambda d: (d / MANIFEST_NAME).write_text("{not json"), (MANIFEST_NAME, "corrupted")),
])
def test_manifest_names_the_damaged_file(tmp_path, damage, words):
    d = _folder(tmp_path)
    write_manifest(d)
    damage(d)
    with pytest.raises(ValueError) as err:
        verify_manifest(d)
    for word in words:
        assert word in str(err.value)


def _write(run, step, fail=False):
    def payload(d):
        (d / "weights.bin").write_bytes(step.to_bytes(4, "little") * 100)
        if fail:
            raise RuntimeError("disk full")

    return ckpt_io.write_checkpoint(run, step, {"payload": payload})


def test_interrupted_write_leaves_no_checkpoint(tmp_path):
    _write(tmp_path, 1)
    with pytest.raises(RuntimeError):
        _write(tmp_path, 2, fail=True)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert ckpt_io.find_latest_valid(tmp_path).name == "step_00000001"
    _write(tmp_path, 2)  # the leftover temp folder is cleared and the step written
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


def test_find_latest_valid_falls_back_and_prune_keeps_last(tmp_path):
    for step in (1, 2, 3, 4):
        _write(tmp_path, step)
    assert [int(p.name[5:]) for p in ckpt_io.prune_checkpoints(tmp_path, keep_last=3)] == [1]
    newest = ckpt_io.list_checkpoints(tmp_path)[-1]
    (newest / "weights.bin").write_bytes(b"cut")
    with pytest.raises(ValueError, match="weights.bin"):
        ckpt_io.verify(newest)
    with pytest.warns(UserWarning, match="step_00000004.*weights.bin"):
        assert ckpt_io.find_latest_valid(tmp_path).name == "step_00000003"
    # pruning never removes the newest checkpoint that still verifies
    (ckpt_io.list_checkpoints(tmp_path)[-2] / "weights.bin").unlink()
    (ckpt_io.list_checkpoints(tmp_path)[-1] / "weights.bin").unlink()
    ckpt_io.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003",
                                                                    "step_00000004"]
    assert ckpt_io.find_latest_valid(tmp_path, warn=False).name == "step_00000002"


def test_rng_state_round_trip_through_torch_save(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = ckpt_io.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.randn(3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt_io.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.randn(3), torch.rand(3))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])
