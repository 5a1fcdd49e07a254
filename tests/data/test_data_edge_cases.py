"""Edge cases of the data pipeline found in review: cache keys, tokenizer vocabularies, file encodings."""

import json
import re

import pytest

from hybrid_lm.data import DataConfig
from hybrid_lm.data import prepare as prepare_mod


def test_shakespeare_cache_key_tracks_max_documents():
    # a run capped at a few scenes must not reuse (or leave behind for) the cache of the whole corpus
    full = prepare_mod.cache_key(DataConfig(source="shakespeare"))
    assert prepare_mod.cache_key(DataConfig(source="shakespeare", max_documents=3)) != full
    assert prepare_mod.cache_key(DataConfig(source="shakespeare", max_documents=3)) != \
        prepare_mod.cache_key(DataConfig(source="shakespeare", max_documents=4))


def _gappy_tokenizer(folder):
    # ids 0, 1, 7: three tokens, but the model needs 8 embedding rows
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 7}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_tokenizer_with_id_gaps_covers_its_largest_id(tmp_path):
    from hybrid_lm.data import load_tokenizer, prepare_data
    tok_dir = _gappy_tokenizer(tmp_path / "tok")
    assert load_tokenizer(tok_dir)[1].vocab_size == 8
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n\n".join(["a b a", "b b", "a", "b a b"]), encoding="utf-8")
    prepared = prepare_data(DataConfig(source=str(corpus), tokenizer=str(tok_dir), val_fraction=0.25,
                                       cache_dir=str(tmp_path / "cache")))
    assert prepared.vocab_size == 8
    assert 7 in prepared.train
    assert int(prepared.train.max()) < prepared.vocab_size and int(prepared.val.max()) < prepared.vocab_size


@pytest.mark.parametrize("kind", ["txt", "folder", "jsonl"])
def test_invalid_utf8_names_the_file(tmp_path, kind):
    from hybrid_lm.data import load_documents
    bad = b"caf\xe9 au lait"  # latin-1, not UTF-8
    if kind == "txt":
        path = tmp_path / "c.txt"
        path.write_bytes(b"fine\n\n\n" + bad)
        where = str(path)
    elif kind == "folder":
        path = tmp_path / "docs"
        (path / "sub").mkdir(parents=True)
        (path / "a.txt").write_text("fine", encoding="utf-8")
        (path / "sub" / "b.txt").write_bytes(bad)
        where = str(path / "sub" / "b.txt")
    else:
        path = tmp_path / "c.jsonl"
        path.write_bytes(b'{"text": "fine"}\n{"text": "' + bad + b'"}\n')
        where = f"{path}:2"
    with pytest.raises(ValueError, match=re.escape(where) + ".*not valid UTF-8"):
        load_documents(str(path))


def test_jsonl_lines_and_unicode(tmp_path):
    from hybrid_lm.data import load_documents
    path = tmp_path / "c.jsonl"
    rows = ["héllo wörld ✓", "line\u2028sep and \r inside", "日本語"]
    path.write_bytes(b"\r\n".join(json.dumps({"text": r}, ensure_ascii=False).encode() for r in rows) + b"\r\n\n")
    assert load_documents(str(path)) == rows


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_utf8_byte_order_mark_is_not_text(tmp_path, kind):
    from hybrid_lm.data import load_documents
    path = tmp_path / f"c.{kind}"
    body = "first\n\n\nsecond" if kind == "txt" else '{"text": "first"}\n{"text": "second"}\n'
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_documents(str(path)) == ["first", "second"]


def test_max_documents_on_a_pretokenized_source_is_refused_not_ignored(tmp_path):
    import numpy as np

    from hybrid_lm.data import prepare_data

    path = tmp_path / "t.bin"
    np.array([1, 2, 0, 3, 4, 0, 5, 0], dtype=np.uint16).tofile(path)
    (tmp_path / "t.json").write_text(json.dumps({"dtype": "uint16", "eos_id": 0, "vocab_size": 300}))
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    assert len(prepare_data(cfg).train) + len(prepare_data(cfg).val) == 8
    with pytest.raises(ValueError, match="max_documents = 2 does not apply to a pre-tokenized source"):
        prepare_data(DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"), max_documents=2))
