"""prepare_data: cache reuse and atomicity, the held-out split by documents, stats, local and pre-tokenized sources."""

import contextlib
import json
import sys
import threading
import time
import types

import numpy as np
import pytest
from tokenizers import Tokenizer

from hybrid_lm.data import DataConfig, prepare_data, shakespeare_documents
from hybrid_lm.data import prepare as prepare_mod
from hybrid_lm.data.prepare import split_documents


def split_docs(stream: np.ndarray, eos_id: int) -> list[np.ndarray]:
    ends = np.flatnonzero(np.asarray(stream) == eos_id) + 1
    assert len(stream) == 0 or ends[-1] == len(stream), "every document, the last included, ends with eos"
    return [np.asarray(d[:-1]) for d in np.split(np.asarray(stream), ends[:-1])] if len(stream) else []


def decode_docs(prepared, stream) -> list[str]:
    tok = Tokenizer.from_file(str(prepared.tokenizer_path))
    return [tok.decode(d.tolist(), skip_special_tokens=False) for d in split_docs(stream, prepared.eos_id)]


def write_corpus(path, n_docs=40):
    words = "thou art more lovely and more temperate rough winds do shake the darling buds of may".split()
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.choice(words, size=60)) + f" doc{i}." for i in range(n_docs)]
    path.write_text("\n\n\n".join(docs))
    return docs


def test_shakespeare_split_by_documents(shakespeare):
    docs = [text for _, text in shakespeare_documents()]
    train_idx, val_idx = split_documents(len(docs), 0.05, 0)
    assert set(train_idx).isdisjoint(val_idx) and len(train_idx) + len(val_idx) == len(docs)
    # the streams hold exactly these documents, in order, each decoding back to its text
    assert decode_docs(shakespeare, shakespeare.val) == [docs[i] for i in val_idx]
    assert decode_docs(shakespeare, shakespeare.train) == [docs[i] for i in train_idx]
    assert set(decode_docs(shakespeare, shakespeare.val)).isdisjoint(decode_docs(shakespeare, shakespeare.train))


def test_shakespeare_stats(shakespeare):
    s = shakespeare.stats
    assert shakespeare.train.dtype == np.uint16 and isinstance(shakespeare.train, np.memmap)
    assert s["num_train_tokens"] == len(shakespeare.train) and s["num_val_tokens"] == len(shakespeare.val)
    assert s["num_train_documents"] == int((shakespeare.train == shakespeare.eos_id).sum())
    assert s["num_val_documents"] == int((shakespeare.val == shakespeare.eos_id).sum())
    assert s["num_documents"] == s["num_train_documents"] + s["num_val_documents"] > 600
    assert 0.03 < s["num_val_documents"] / s["num_documents"] < 0.07
    p = np.bincount(shakespeare.train, minlength=shakespeare.vocab_size) / len(shakespeare.train)
    entropy = -sum(x * np.log(x) for x in p if x > 0)
    assert s["unigram_entropy"] == pytest.approx(entropy, rel=1e-9)
    assert 4.0 < s["unigram_entropy"] < np.log(shakespeare.vocab_size)
    assert s["train_bytes"] / s["num_train_tokens"] > 2.5  # the BPE compresses


def test_cache_reuse(shakespeare, shakespeare_cache):
    start = time.perf_counter()
    again = prepare_data(DataConfig(source="shakespeare", cache_dir=str(shakespeare_cache)))
    assert time.perf_counter() - start < 1.0
    assert again.cache_path == shakespeare.cache_path
    assert np.array_equal(again.train, shakespeare.train) and np.array_equal(again.val, shakespeare.val)
    assert again.stats == shakespeare.stats
    assert [p.name for p in shakespeare_cache.iterdir() if not p.name.endswith(".lock")] == [again.cache_path.name]


def test_cache_key_tracks_inputs(tmp_path):
    corpus = tmp_path / "c.txt"
    write_corpus(corpus)
    cfg = DataConfig(source=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    key = prepare_mod.cache_key(cfg)
    assert prepare_mod.cache_key(DataConfig(**{**cfg.to_dict(), "seed": 1})) != key
    assert prepare_mod.cache_key(DataConfig(**{**cfg.to_dict(), "vocab_size": 400})) != key
    assert prepare_mod.cache_key(DataConfig(**{**cfg.to_dict(), "val_fraction": 0.1})) != key
    corpus.write_text(corpus.read_text() + "\n\n\nmore")
    assert prepare_mod.cache_key(cfg) != key


def test_local_txt_and_val_fraction_zero(tmp_path):
    corpus = tmp_path / "c.txt"
    docs = write_corpus(corpus)
    cfg = DataConfig(source=str(corpus), vocab_size=300, val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg)
    val = decode_docs(prepared, prepared.val)
    train = decode_docs(prepared, prepared.train)
    assert len(val) == 4 and sorted(val + train) == sorted(docs) and set(val).isdisjoint(train)
    whole = prepare_data(DataConfig(**{**cfg.to_dict(), "val_fraction": 0.0}))
    assert len(whole.val) == 0 and decode_docs(whole, whole.train) == docs


def test_existing_tokenizer_and_eos_text_in_corpus(tmp_path, shakespeare):
    rows = [{"text": f"ROMEO:\nA line <|endoftext|> with the eos text inside, number {i}.\n"} for i in range(10)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(path), tokenizer=str(shakespeare.tokenizer_path), val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg)
    assert prepared.vocab_size == shakespeare.vocab_size and prepared.eos_id == shakespeare.eos_id
    # the literal "<|endoftext|>" in the text is encoded as plain bytes, so it adds no document boundary
    assert prepared.stats["num_train_documents"] == 8 and prepared.stats["num_val_documents"] == 2
    assert sorted(decode_docs(prepared, prepared.train) + decode_docs(prepared, prepared.val)) == \
        sorted(r["text"] for r in rows)


def test_single_document_needs_val_fraction_zero(tmp_path):
    corpus = tmp_path / "one.txt"
    corpus.write_text("just one document\n\nwith two paragraphs")
    with pytest.raises(ValueError, match="1 document.*val_fraction: 0"):
        prepare_data(DataConfig(source=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache")))


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    write_corpus(corpus)
    cfg = DataConfig(source=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    real = prepare_mod._encode_to_file

    def crash(*args, **kwargs):
        real(*args, **kwargs)  # the train split is fully written before the "crash"
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "_encode_to_file", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(prepare_mod, "_encode_to_file", real)
    assert prepare_data(cfg).stats["num_documents"] == 40


@pytest.mark.parametrize("lock", [True, False])
def test_concurrent_prepare(tmp_path, monkeypatch, lock):
    corpus = tmp_path / "c.txt"
    write_corpus(corpus)
    cfg = DataConfig(source=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    if not lock:
        # without a lock both "ranks" build; make them finish together so the rename race really happens
        monkeypatch.setattr(prepare_mod, "_file_lock", lambda path: contextlib.nullcontext())
        barrier, real = threading.Barrier(2), prepare_mod._build

        def build(*args):
            real(*args)
            barrier.wait(timeout=30)
        monkeypatch.setattr(prepare_mod, "_build", build)
    results, errors = [], []

    def worker():
        try:
            results.append(prepare_data(cfg))
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2
    assert np.array_equal(results[0].train, results[1].train)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == \
        [results[0].cache_path.name]


def test_pretokenized_bin_from_cache(shakespeare, tmp_path):
    # a prepared cache's train.bin (+ train.json) is itself a valid pre-tokenized source
    cfg = DataConfig(source=str(shakespeare.cache_path / "train.bin"), val_fraction=0.1,
                     cache_dir=str(tmp_path / "cache"))
    pre = prepare_data(cfg)
    assert pre.tokenizer_path == shakespeare.tokenizer_path and pre.eos_id == shakespeare.eos_id
    assert np.array_equal(np.concatenate([pre.train, pre.val]), shakespeare.train)
    assert pre.train[-1] == pre.eos_id and pre.val[-1] == pre.eos_id
    n_docs = shakespeare.stats["num_train_documents"]
    assert pre.stats["num_val_documents"] == round(0.1 * n_docs) == int((pre.val == pre.eos_id).sum())
    counts = np.bincount(pre.train, minlength=pre.vocab_size)
    p = counts[counts > 0] / counts.sum()
    assert pre.stats["unigram_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert prepare_data(cfg).stats == pre.stats


def test_pretokenized_npy(tmp_path, shakespeare):
    ids = np.array([5, 6, 0, 7, 0, 8, 9, 10, 0, 11], dtype=np.int32)  # the last document lacks an eos
    np.save(tmp_path / "t.npy", ids)
    cfg = DataConfig(source=str(tmp_path / "t.npy"), val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="unknown eos_id/vocab_size.*data.tokenizer"):
        prepare_data(cfg)
    pre = prepare_data(DataConfig(**{**cfg.to_dict(), "tokenizer": str(shakespeare.tokenizer_path)}))
    assert pre.train.tolist() == [5, 6, 0, 7, 0, 8, 9, 10, 0] and pre.val.tolist() == [11]
    (tmp_path / "t.json").write_text(json.dumps({"eos_id": 0, "vocab_size": 12}))
    pre = prepare_data(DataConfig(**{**cfg.to_dict(), "val_fraction": 0.5}))
    assert pre.train.tolist() == [5, 6, 0, 7, 0] and pre.tokenizer_path is None and pre.vocab_size == 12


def test_pretokenized_errors(tmp_path):
    path = tmp_path / "t.bin"
    np.array([1, 2, 0, 3, 4000, 0], dtype=np.uint16).tofile(path)
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"t\.json not found.*dtype.*eos_id.*vocab_size"):
        prepare_data(cfg)
    (tmp_path / "t.json").write_text(json.dumps({"dtype": "uint16", "eos_id": 0, "vocab_size": 300}))
    with pytest.raises(ValueError, match=r"t\.bin: token id 4000 at position 4 is outside \[0, vocab_size=300\)"):
        prepare_data(cfg)
    np.array([1, 2, 3], dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="only 1 document.*val_fraction: 0"):
        prepare_data(cfg)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        prepare_data(cfg)
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a whole number of uint16"):
        prepare_data(cfg)
    with pytest.raises(ValueError, match="no such file"):
        prepare_data(DataConfig(source=str(tmp_path / "missing.bin")))


def test_hf_source_end_to_end(tmp_path, monkeypatch):
    rows = [{"text": f"streamed document number {i}: " + "words and more words " * 5} for i in range(100)]
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split, streaming: iter(rows))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    cfg = DataConfig(source="hf:org/name", max_documents=20, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg)
    assert prepared.cache_path.name.startswith("org_name-bpe300-")
    assert sorted(decode_docs(prepared, prepared.train) + decode_docs(prepared, prepared.val)) == \
        sorted(r["text"] for r in rows[:20])
    monkeypatch.setitem(sys.modules, "datasets", None)  # the cache is reused: no second download
    assert prepare_data(cfg).cache_path == prepared.cache_path


def test_a_cut_cache_file_is_refused_not_reused(tmp_path):
    corpus = tmp_path / "c.txt"
    write_corpus(corpus)
    cfg = DataConfig(source=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg)
    train_bin = prepared.cache_path / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[: train_bin.stat().st_size // 2])  # a crash or a full disk
    with pytest.raises(ValueError, match=r"train\.bin holds .* bytes, meta\.json says .*delete the folder"):
        prepare_data(cfg)
