"""`export_deepseek_v32` with force=True must not delete its own source (an OUT that holds the checkpoint), and a
failed export must leave an earlier one whole, as `hybrid-lm convert` and `export_qwen3_next` do."""

import pytest
import torch

import hybrid_lm
from hybrid_lm.convert_deepseek_v32 import export_deepseek_v32
from hybrid_lm.zoo import find_config

pytest.importorskip("transformers")


@pytest.fixture
def run(tmp_path):
    torch.manual_seed(0)
    cfg = hybrid_lm.config_replace(hybrid_lm.load_config(find_config("deepseek-v32-tiny")), vocab_size=300)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    hybrid_lm.save_model(hybrid_lm.build_model(cfg), ckpt)
    return ckpt


def test_force_never_replaces_the_folder_holding_the_source(run, tmp_path):
    with pytest.raises(ValueError, match="would replace the source"):
        export_deepseek_v32(run, tmp_path / "run", force=True)
    hybrid_lm.load_model(run)  # still there


def test_a_failed_export_leaves_the_earlier_one_whole(run, tmp_path, monkeypatch):
    out = export_deepseek_v32(run, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import hybrid_lm.convert as convert  # the converters' shared staged writer

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_deepseek_v32(run, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary folder left
