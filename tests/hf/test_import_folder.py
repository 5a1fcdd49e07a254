"""`import_hf` into a folder that already holds files: it must not write native weights over an export (or over
another model's files) and must leave no half-written OUT behind."""

import warnings

import pytest
import torch

import hybrid_lm
from hybrid_lm.hf import export_hf, import_hf

from .test_export import save_checkpoint, tiny


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = tiny(["gated_deltanet", "attention"])
    save_checkpoint(model, tmp_path / "run")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no tokenizer.json")
        export_hf(tmp_path / "run", tmp_path / "hf")
    return model, tmp_path / "hf"


def test_import_into_the_export_itself_is_refused_and_leaves_it_whole(exported):
    _, hf = exported
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    with pytest.raises(ValueError, match="not empty"):
        import_hf(hf, hf)
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before


def test_import_into_a_non_empty_folder_is_refused(exported, tmp_path):
    _, hf = exported
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "tokenizer.json").write_text("{}")  # another model's tokenizer must not be trusted
    with pytest.raises(ValueError, match="not empty"):
        import_hf(hf, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["tokenizer.json"]


def test_a_failed_import_leaves_no_output(exported, tmp_path, monkeypatch):
    model, hf = exported
    import hybrid_lm.hf.export as export

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_manifest", fail)
    with pytest.raises(OSError, match="disk full"):
        import_hf(hf, tmp_path / "back")
    assert not (tmp_path / "back").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    back = hybrid_lm.load_model(import_hf(hf, tmp_path / "empty"))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
