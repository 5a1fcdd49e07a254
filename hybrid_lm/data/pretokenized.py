"""Pre-tokenized sources: a flat stream of token ids in which every document ends with eos.

- ``name.bin``: raw ids, described by ``name.json`` beside it:
  ``{"dtype": "uint16", "eos_id": 0, "vocab_size": 4096, "tokenizer": "optional/path/to/tokenizer.json"}``
  (a relative tokenizer path is relative to the .json). The ``train.bin``/``val.bin`` in a prepared cache folder
  follow this format.
- ``name.npy``: a 1-D integer array; eos_id and vocab_size come from ``name.json`` if present, else from
  ``data.tokenizer``.

The file is memory-mapped, never copied: the held-out split is the last ``val_fraction`` of the documents (cut at
an eos), so train and val are two views of the same file. The scan that validates ids and finds the cut runs once;
its result is cached in ``<cache_dir>/<stem>-pretok-<hash>.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np

from .config import DataConfig, PreparedData, unigram_entropy
from .tokenizer import load_tokenizer

_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning, bounds the temporary arrays to ~100 MB


def prepare_pretokenized(cfg: DataConfig) -> PreparedData:
    """Open a pre-tokenized .bin/.npy source, validate it, and split it into train/val views."""
    path = Path(cfg.source).expanduser().resolve()
    if cfg.max_documents is not None:  # the file is memory-mapped whole: a cap would be silently ignored
        raise ValueError(f"data.max_documents = {cfg.max_documents} does not apply to a pre-tokenized source "
                         f"({path.name}, used whole); set data.max_documents to null, or write a shorter file")
    meta_path = path.with_suffix(".json")
    meta = _read_meta(meta_path, required=path.suffix.lower() == ".bin")
    tokens = _open_tokens(path, meta)
    tok_path, eos_id, vocab_size, bos_id = _resolve_vocab(cfg, path, meta_path, meta)
    stats = _cached_scan(cfg, path, tokens, eos_id, vocab_size)
    cut = stats["cut"]
    return PreparedData(train=tokens[:cut], val=tokens[cut:], tokenizer_path=tok_path, vocab_size=vocab_size,
                        eos_id=eos_id, bos_id=bos_id, stats={k: v for k, v in stats.items() if k != "cut"},
                        cache_path=None)


def _read_meta(meta_path: Path, required: bool) -> dict:
    if not meta_path.is_file():
        if required:
            raise ValueError(f"{meta_path} not found: a .bin token file needs a .json beside it with its "
                             f'"dtype" (e.g. "uint16"), "eos_id" and "vocab_size"')
        return {}
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object with dtype, eos_id and vocab_size")
    return meta


def _open_tokens(path: Path, meta: dict) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable .npy file ({e})") from None
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"{path}: expected a 1-D integer array of token ids, got {tokens.dtype} {tokens.shape}")
    else:
        try:
            dtype = np.dtype(meta.get("dtype", "uint16"))
        except TypeError:
            raise ValueError(f"{path.with_suffix('.json')}: unknown dtype {meta.get('dtype')!r}") from None
        if dtype.kind not in "iu":
            raise ValueError(f"{path.with_suffix('.json')}: dtype {dtype} is not an integer type")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype} ids; wrong dtype in the .json?")
        tokens = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    if len(tokens) == 0:
        raise ValueError(f"{path}: the token file is empty")
    return tokens


def _resolve_vocab(cfg: DataConfig, path: Path, meta_path: Path, meta: dict):
    """(tokenizer path or None, eos_id, vocab_size, bos_id) from the meta file and/or a tokenizer."""
    tok_spec = cfg.tokenizer
    if tok_spec is None and meta.get("tokenizer"):
        tok_spec = str(meta_path.parent / meta["tokenizer"])
    info = load_tokenizer(tok_spec)[1] if tok_spec is not None else None
    eos_id = meta.get("eos_id", info.eos_id if info else None)
    vocab_size = meta.get("vocab_size", info.vocab_size if info else None)
    if eos_id is None or vocab_size is None:
        raise ValueError(f"{path}: unknown eos_id/vocab_size; write them in {meta_path} "
                         f'(e.g. {{"eos_id": 0, "vocab_size": 4096}}) or set data.tokenizer')
    if not (isinstance(eos_id, int) and isinstance(vocab_size, int) and 0 <= eos_id < vocab_size):
        raise ValueError(f"{meta_path}: need integers 0 <= eos_id < vocab_size, got {eos_id=} {vocab_size=}")
    if info is not None and (info.eos_id != eos_id or info.vocab_size < vocab_size):
        raise ValueError(f"{path}: tokenizer {info.path} (eos_id={info.eos_id}, vocab_size={info.vocab_size}) "
                         f"does not match the token file (eos_id={eos_id}, vocab_size={vocab_size})")
    return (info.path if info else None), eos_id, vocab_size, (info.bos_id if info else None)


def _cached_scan(cfg: DataConfig, path: Path, tokens: np.ndarray, eos_id: int, vocab_size: int) -> dict:
    st = path.stat()
    identity = [str(path), st.st_size, st.st_mtime_ns, str(tokens.dtype), eos_id, vocab_size, cfg.val_fraction, 1]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    cache = cfg.resolved_cache_dir() / f"{path.stem}-pretok-{digest}.json"
    if cache.is_file():
        with open(cache, encoding="utf-8") as f:
            return json.load(f)
    stats = _scan(path, tokens, eos_id, vocab_size, cfg.val_fraction)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, cache)
    return stats


def _scan(path: Path, tokens: np.ndarray, eos_id: int, vocab_size: int, val_fraction: float) -> dict:
    """Validate every id, find document ends, pick the train/val cut and count train unigrams."""
    ends = []
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = np.asarray(tokens[start:start + _SCAN_CHUNK])
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0 or hi >= vocab_size:
            bad = int(np.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0])
            raise ValueError(f"{path}: token id {int(chunk[bad])} at position {start + bad} is outside "
                             f"[0, vocab_size={vocab_size}); fix vocab_size in the .json or re-tokenize the data")
        ends.append(np.flatnonzero(chunk == eos_id) + start + 1)
    doc_ends = np.concatenate(ends)
    if len(doc_ends) == 0 or doc_ends[-1] != len(tokens):
        doc_ends = np.append(doc_ends, len(tokens))  # a last document without a trailing eos still counts
    n_docs = len(doc_ends)
    if val_fraction == 0:
        n_val = 0
    elif n_docs < 2:
        raise ValueError(f"{path}: only {n_docs} document (eos_id never separates two): a held-out split needs "
                         f"at least 2; end each document with eos_id or set data.val_fraction: 0")
    else:
        n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    cut = int(doc_ends[n_docs - n_val - 1])
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, cut, _SCAN_CHUNK):
        counts += np.bincount(np.asarray(tokens[start:min(cut, start + _SCAN_CHUNK)]).astype(np.int64),
                              minlength=vocab_size)
    return {
        "source": str(path), "cut": cut,
        "num_documents": n_docs, "num_train_documents": n_docs - n_val, "num_val_documents": n_val,
        "num_tokens": len(tokens), "num_train_tokens": cut, "num_val_tokens": len(tokens) - cut,
        "train_bytes": None, "val_bytes": None, "unigram_entropy": unigram_entropy(counts),
    }
