"""Byte-level BPE tokenizer (GPT-2 style, Radford et al. 2019) trained with the Hugging Face `tokenizers` library.

Byte-level means every string round-trips exactly: decode(encode(x)) == x, with no unknown token. The only
special token is ``<|endoftext|>`` (id 0), appended after every document as its eos. The folder written by
``train_bpe_tokenizer`` holds ``tokenizer.json`` plus the files transformers' ``AutoTokenizer`` needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# tried in order when a user-supplied tokenizer has no tokenizer_config.json naming its eos
_KNOWN_EOS = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
MIN_VOCAB = 257  # 256 byte symbols + eos


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path  # the tokenizer.json
    vocab_size: int
    eos_id: int
    bos_id: int | None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir``; returns the tokenizer.json path."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: use at least {MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps the first word of a text unchanged, so decoding restores the text exactly
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tok.save(str(path))
    _save_transformers_files(path)
    return path


def _save_transformers_files(path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(path), eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        model_max_length=1 << 30, clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(path.parent))
    # transformers 5 records its own backend class name; the older name loads in both 4.x and 5.x
    config_path = path.parent / "tokenizer_config.json"
    config = _read_tokenizer_config(path.parent)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = path.parent / "special_tokens_map.json"
    if not special.exists():
        special.write_text(json.dumps({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}, indent=2) + "\n",
                           encoding="utf-8")


def resolve_tokenizer_file(spec: str | Path) -> Path:
    """A tokenizer.json path, or a folder holding one. Raises ValueError naming what is missing."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer {str(spec)!r}: {str(path)!r} not found; pass a tokenizer.json file "
                         f"(or a folder with one), or set data.tokenizer to null to train one on the corpus")
    return path


def load_tokenizer(spec: str | Path) -> tuple[Tokenizer, TokenizerInfo]:
    """Load a tokenizer.json and find its eos (and bos, if it declares one)."""
    path = resolve_tokenizer_file(spec)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"tokenizer {str(path)!r} could not be loaded by the tokenizers library: {e}") from None
    config = _read_tokenizer_config(path.parent)
    eos = _token_text(config.get("eos_token"))
    candidates = (eos,) if eos else _KNOWN_EOS
    eos_id = next((tok.token_to_id(t) for t in candidates if tok.token_to_id(t) is not None), None)
    if eos_id is None:
        raise ValueError(f"tokenizer {str(path)!r}: no end-of-text token found (tried {list(candidates)}); "
                         f"add a tokenizer_config.json beside it with an 'eos_token' entry")
    bos = _token_text(config.get("bos_token"))
    bos_id = tok.token_to_id(bos) if bos else None
    # a vocabulary with gaps in its ids (or added tokens placed past it) has ids >= its token count: the model's
    # embedding must cover the largest id, not the count
    ids = tok.get_vocab(with_added_tokens=True).values()
    vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
    info = TokenizerInfo(path=path, vocab_size=vocab_size, eos_id=eos_id, bos_id=bos_id if bos_id != eos_id else None)
    return tok, info


def _read_tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(entry) -> str | None:
    # transformers writes special tokens either as plain strings or as AddedToken dicts
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None
