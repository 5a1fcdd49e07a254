"""A training corpus with recall data mixed in, as a pre-tokenized source the trainer reads unchanged.

Small models only learn the recall formats of `tasks.py` if they see them in training, so the comparison recipe
trains on the train split of a text corpus interleaved with generated MQAR / passkey documents (filler from the
train split only). The held-out split of the text corpus goes last, untouched, and `val_fraction` is chosen so
that the trainer's document-count cut falls exactly there: the held-out split stays pure text.

Output folder: `mix.bin` + `mix.json` (a pre-tokenized source, see `hybrid_lm.data.pretokenized`), `tokenizer/`,
`mix-mask.npy` (uint8 aligned with `mix.bin`: 1 where the token is a training target; text is all 1s, a recall
document only at its answers; see `masked.py`) and `mix-info.json` (settings, counts, the `val_fraction`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data import DataConfig, PreparedData, load_tokenizer, prepare_data
from ..data.config import token_dtype
from .tasks import POOL_SIZE, TRAIN_TASKS, Filler, RecallSample, RecallVocab, make_copy, make_mqar, make_passkey

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
COPY_LENGTHS = (16, 64)  # copy documents stay short: there the induction circuit forms within a few hundred steps


@dataclass
class MixConfig:
    recall_fraction: float = 0.5          # share of the training tokens that are recall documents
    recall_tokens: int | None = None      # or: this many recall tokens (a big run needs more than the text)
    tasks: dict[str, float] = field(default_factory=lambda: {"mqar": 0.5, "passkey": 0.25, "copy": 0.25})
    min_length: int = 24                  # recall document lengths with their eos, log-uniform in [min, max]
    max_length: int = 512
    loss_mask: bool = True                # recall documents train on their answers only
    seed: int = 0
    pool_size: int = POOL_SIZE            # MQAR key ids and, separately, value ids (`tasks.RecallVocab`)
    max_pairs: int | None = None          # MQAR pairs per document: uniform in [1, min(length // 4, max_pairs)]

    def validate(self, where: str = "mix") -> None:
        if not 0 < self.recall_fraction < 1:
            raise ValueError(f"{where}.recall_fraction = {self.recall_fraction}: must be in (0, 1)")
        if self.recall_tokens is not None and self.recall_tokens < 1:
            raise ValueError(f"{where}.recall_tokens = {self.recall_tokens}: must be >= 1 (or null)")
        unknown = sorted(set(self.tasks) - set(TRAIN_TASKS))
        if unknown or not self.tasks or any(w < 0 for w in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise ValueError(f"{where}.tasks = {self.tasks}: give weights >= 0 (not all 0) to tasks among "
                             f"{list(TRAIN_TASKS)}")
        if not 16 <= self.min_length <= self.max_length:
            raise ValueError(f"{where}: need 16 <= min_length ({self.min_length}) <= max_length ({self.max_length})")
        if self.pool_size < 8:
            raise ValueError(f"{where}.pool_size = {self.pool_size}: must be >= 8")
        pairs = self.max_length // 4 if self.max_pairs is None else self.max_pairs
        if (self.max_pairs is not None and self.max_pairs < 1) or pairs > self.pool_size:
            raise ValueError(f"{where}: MQAR documents would hold up to {pairs} pairs (max_pairs = {self.max_pairs}, "
                             f"max_length // 4 = {self.max_length // 4}) but the key pool has {self.pool_size} ids; "
                             "set max_pairs between 1 and pool_size")

    def settings(self) -> dict:
        """The settings a built mix is recorded with; fields added after format 2 only when they differ from their
        defaults, so a mix built before them (e.g. one copied to a machine without the corpus) stays valid."""
        later = {"pool_size": POOL_SIZE, "max_pairs": None}
        return {k: v for k, v in asdict(self).items() if k not in later or v != later[k]}


@dataclass
class RecallMix:
    source: Path          # the .bin to put in `data.source`
    val_fraction: float   # the `data.val_fraction` that keeps the held-out split pure text
    mask: Path | None     # `mix-mask.npy` when `loss_mask` is on
    info: dict


def split_documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """Documents of a stream, each with its eos."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id) + 1
    return [d for d in np.split(np.asarray(tokens, dtype=np.int64), ends) if len(d)]


def _recall_documents(prepared: PreparedData, vocab: RecallVocab, cfg: MixConfig,
                      budget: int) -> list[RecallSample]:
    """Recall documents of about `budget` tokens in all, each ending with eos (not a target)."""
    rng = np.random.default_rng(cfg.seed)
    filler = Filler(prepared.train, prepared.eos_id)
    names = sorted(cfg.tasks)
    weights = np.array([cfg.tasks[n] for n in names], dtype=np.float64)
    docs, total = [], 0
    while total < budget:
        # log-uniform: many short documents, where a small model first finds the induction circuit (a match among
        # 32 positions gets 4x the initial gradient of one among 128), and long ones that carry it further
        length = int(np.exp(rng.uniform(np.log(cfg.min_length), np.log(cfg.max_length + 1)))) - 1  # + eos, below
        task = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        if task == "mqar":  # from one pair in a sea of text to a context packed with pairs
            most = length // 4 if cfg.max_pairs is None else min(length // 4, cfg.max_pairs)
            sample = make_mqar(rng, length, vocab, filler, num_pairs=int(rng.integers(1, most + 1)))
        elif task == "passkey":
            sample = make_passkey(rng, max(length, vocab.passkey_overhead), vocab, filler)
        else:
            sample = make_copy(rng, int(rng.integers(COPY_LENGTHS[0], COPY_LENGTHS[1] + 1)), vocab)
        sample.input_ids = np.append(sample.input_ids, prepared.eos_id)
        docs.append(sample)
        total += len(sample.input_ids)
    return docs


def _answer_mask(sample: RecallSample) -> np.ndarray:
    mask = np.zeros(len(sample.input_ids), dtype=np.uint8)
    for positions in sample.answers:
        mask[positions] = 1
    return mask


def trained_pool_size(source: str | Path) -> int | None:
    """The MQAR pool size of the recall mix a data source names (its `mix-info.json`), or None if it is none."""
    info = Path(source).with_name("mix-info.json")
    if Path(source).name != "mix.bin" or not info.is_file():
        return None
    return json.loads(info.read_text())["settings"]["mix"].get("pool_size", POOL_SIZE)


def write_recall_mix(data: DataConfig, out_dir: str | Path, cfg: MixConfig | None = None) -> RecallMix:
    """Build (or reuse, when its settings match) the mixed corpus for the text source `data` in `out_dir`."""
    cfg = cfg or MixConfig()
    cfg.validate()
    out = Path(out_dir)
    info_path = out / "mix-info.json"
    wanted = {"data": data.to_dict(), "mix": cfg.settings(), "format": 2}
    mask_path = out / "mix-mask.npy" if cfg.loss_mask else None
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == wanted and (out / "mix.bin").is_file():
            return RecallMix(out / "mix.bin", info["val_fraction"], mask_path, info)
    prepared = prepare_data(data)
    if prepared.tokenizer_path is None:
        raise ValueError(f"data source {data.source!r} has no tokenizer: the recall tasks need one to spell the "
                         "passkey prompt; set data.tokenizer")
    tokenizer, tok_info = load_tokenizer(prepared.tokenizer_path)
    specials = [i for i in (prepared.eos_id, tok_info.bos_id) if i is not None]
    vocab = RecallVocab.from_tokenizer(tokenizer, prepared.vocab_size, specials, cfg.pool_size)
    text_docs = split_documents(prepared.train, prepared.eos_id)
    val_docs = split_documents(prepared.val, prepared.eos_id)
    if not val_docs:
        raise ValueError(f"data source {data.source!r} has no held-out split (val_fraction = 0); the comparison "
                         "needs one for perplexity")
    budget = cfg.recall_tokens or int(len(prepared.train) * cfg.recall_fraction / (1 - cfg.recall_fraction))
    recall_docs = _recall_documents(prepared, vocab, cfg, budget)
    train_docs = text_docs + [s.input_ids for s in recall_docs]
    masks = [np.ones(len(d), dtype=np.uint8) for d in text_docs] + [_answer_mask(s) for s in recall_docs]
    order = np.random.default_rng(cfg.seed + 1).permutation(len(train_docs))
    stream = np.concatenate([train_docs[i] for i in order] + val_docs)
    n_docs = len(train_docs) + len(val_docs)
    # written into a private folder and renamed into place file by file (the info last, marking it complete): a
    # concurrent or interrupted build never leaves a half-written file where a reader (or a memmap) sees it
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mix-", dir=out))
    try:
        stream.astype(token_dtype(prepared.vocab_size)).tofile(tmp / "mix.bin")
        if mask_path is not None:
            np.save(tmp / mask_path.name,
                    np.concatenate([masks[i] for i in order] + [np.ones(len(d), np.uint8) for d in val_docs]))
        (tmp / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (prepared.tokenizer_path.parent / name).is_file():
                shutil.copyfile(prepared.tokenizer_path.parent / name, tmp / "tokenizer" / name)
        meta = {"dtype": token_dtype(prepared.vocab_size).name, "eos_id": prepared.eos_id,
                "vocab_size": prepared.vocab_size, "tokenizer": "tokenizer"}
        (tmp / "mix.json").write_text(json.dumps(meta, indent=2) + "\n")
        info = {"settings": wanted, "val_fraction": len(val_docs) / n_docs,
                "documents": {"text": len(text_docs), "recall": len(recall_docs), "held_out": len(val_docs)},
                "tokens": {"text": int(len(prepared.train)),
                           "recall": int(sum(len(s.input_ids) for s in recall_docs)),
                           "held_out": int(len(prepared.val))}}
        (tmp / info_path.name).write_text(json.dumps(info, indent=2) + "\n")
        info_path.unlink(missing_ok=True)  # a crash from here on leaves no info: the next call rebuilds
        (out / "tokenizer").mkdir(exist_ok=True)
        for f in sorted((tmp / "tokenizer").iterdir()):
            os.replace(f, out / "tokenizer" / f.name)
        for name in ("mix.bin", *([mask_path.name] if mask_path else []), "mix.json", info_path.name):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return RecallMix(out / "mix.bin", info["val_fraction"], mask_path, info)
