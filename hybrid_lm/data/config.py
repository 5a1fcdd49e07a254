"""Data configuration (the ``data:`` section of a training YAML) and the prepared result handed to the trainer."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class DataConfig:
    """Where the corpus comes from and how it is tokenized and split. See ``hybrid_lm.data.corpus`` for sources."""

    # "shakespeare" | .txt/.jsonl/.parquet file or folder of .txt | .bin/.npy token ids | "hf:<name>[:<config>]"
    source: str = "shakespeare"
    text_field: str = "text"  # field/column holding the text, for jsonl/parquet/hf
    tokenizer: str | None = None  # an existing tokenizer.json (or folder); None trains a byte-level BPE
    vocab_size: int = 4096  # for the trained BPE; ignored when `tokenizer` is given
    val_fraction: float = 0.05  # held-out share of documents
    cache_dir: str | None = None  # default: $HYBRID_LM_CACHE or ~/.cache/hybrid_lm
    max_documents: int | None = None  # keep only the first N documents (HF streaming, quick tests)
    seed: int = 0  # picks the held-out documents

    def __post_init__(self) -> None:
        _check_types(self)
        if not self.source:
            raise ValueError("data.source is empty; use 'shakespeare', a file/folder path or 'hf:<dataset>'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.vocab_size < 257:
            raise ValueError(f"data.vocab_size={self.vocab_size} must be at least 257 (256 bytes + eos)")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents={self.max_documents} must be a positive integer or null")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "data") -> "DataConfig":
        """Strict construction from a YAML mapping: unknown keys and wrong types raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping of DataConfig fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_cache_dir(self) -> Path:
        base = self.cache_dir or os.environ.get("HYBRID_LM_CACHE") or "~/.cache/hybrid_lm"
        return Path(base).expanduser()


_TYPES = {"source": (str,), "text_field": (str,), "tokenizer": (str, type(None)), "vocab_size": (int,),
          "val_fraction": (float, int), "cache_dir": (str, type(None)), "max_documents": (int, type(None)),
          "seed": (int,)}


def _check_types(cfg: DataConfig) -> None:
    for name, types in _TYPES.items():
        value = getattr(cfg, name)
        # bool is an int subclass, but `vocab_size: true` in a YAML is a mistake, not 1
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"data.{name}={value!r} has type {type(value).__name__}; expected {expected}")
    cfg.val_fraction = float(cfg.val_fraction)


@dataclass
class PreparedData:
    """Token streams ready for packing. Every document is followed by ``eos_id``, so boundaries are recoverable.

    ``train``/``val`` are read-only memmaps (uint16 when the vocabulary fits, else uint32). ``tokenizer_path`` is
    None only for a pre-tokenized source given without any tokenizer.
    """

    train: np.ndarray
    val: np.ndarray
    tokenizer_path: Path | None
    vocab_size: int
    eos_id: int
    bos_id: int | None
    stats: dict = field(default_factory=dict)
    cache_path: Path | None = None  # the folder holding the prepared files


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats/token) of the token frequency distribution: the loss of a model that ignores context."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0].astype(np.float64) / total
    return float(-(p * np.log(p)).sum())
