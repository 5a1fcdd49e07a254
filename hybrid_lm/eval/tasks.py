"""Synthetic long-context recall tasks built on the fly from a model's own vocabulary, no downloads:

- `mqar`: multi-query associative recall (Arora et al. 2023, "Zoology", arXiv 2312.04927): key-value token pairs,
  then filler text, then every key again; the model must name each key's value.
- `passkey`: passkey retrieval (Mohtashami & Jaggi 2023, arXiv 2305.16300): "The passkey is 48213. Remember it."
  hidden at a random depth in filler text, asked for at the end.
- `copy` (training data only): random tokens, repeated. The densest signal for the induction circuit that both
  tasks above rely on (Olsson et al. 2022), so a small model finds it within a CPU budget.

Filler is a stretch of real text (the held-out split when evaluating, the train split when building training data)
with eos removed, so a sample is one document. A sample lists its answers as token positions; scoring is
teacher-forced (`scoring.py`). Shape letters: `T` tokens per sample, `N` key-value pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASKS = ("mqar", "passkey")
TRAIN_TASKS = (*TASKS, "copy")
POOL_SIZE = 256          # ids reserved for MQAR keys and, separately, for values
PASSKEY_DIGITS = 5


@dataclass
class RecallSample:
    input_ids: np.ndarray          # [T] int64
    answers: list[np.ndarray]      # each answer's token positions; position p is predicted from the logits at p - 1


@dataclass(frozen=True)
class RecallVocab:
    """The token ids the tasks are written in, taken from one tokenizer so train and eval data agree."""

    ordinary: np.ndarray           # every id but the special tokens
    keys: np.ndarray               # MQAR key pool
    values: np.ndarray             # MQAR value pool (disjoint from the keys)
    digits: tuple[int, ...]        # ids of "0".."9"
    needle_head: tuple[int, ...]   # " The passkey is "
    needle_tail: tuple[int, ...]   # ". Remember it."
    question: tuple[int, ...]      # " What is the passkey? The passkey is "
    answer_tail: tuple[int, ...]   # "."

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, special_ids=(), pool_size: int = POOL_SIZE) -> "RecallVocab":
        """Keys and values are the last ordinary ids (the rarest BPE merges, least tied to the text): `pool_size`
        each, fewer for a small vocabulary. Training data and evaluation must use the same pool: a smaller one
        is learned in far fewer steps (each key and value id is seen more often), which a CPU budget needs."""
        if pool_size < 8:
            raise ValueError(f"pool_size = {pool_size}: MQAR needs at least 8 key ids and 8 value ids")

        def enc(text):
            return tuple(tokenizer.encode(text, add_special_tokens=False).ids)

        digits = tuple(enc(str(d)) for d in range(10))
        if any(len(d) != 1 for d in digits):
            raise ValueError("passkey needs a tokenizer that encodes each digit 0-9 as one token")
        ordinary = np.setdiff1d(np.arange(vocab_size), np.array(list(special_ids), dtype=np.int64))
        pool = np.setdiff1d(ordinary, np.array([d[0] for d in digits], dtype=np.int64))
        size = min(pool_size, len(pool) // 4)
        if size < 8:
            raise ValueError(f"vocab_size = {vocab_size} is too small for MQAR: need at least 32 ordinary token ids")
        return cls(ordinary=ordinary, keys=pool[-2 * size:-size], values=pool[-size:],
                   digits=tuple(d[0] for d in digits), needle_head=enc(" The passkey is "),
                   needle_tail=enc(". Remember it."), question=enc(" What is the passkey? The passkey is "),
                   answer_tail=enc("."))

    @property
    def passkey_overhead(self) -> int:
        """Tokens of a passkey sample that are not filler."""
        return (len(self.needle_head) + len(self.needle_tail) + len(self.question) + len(self.answer_tail)
                + 2 * PASSKEY_DIGITS)


class Filler:
    """Contiguous stretches of text from a token stream with the eos tokens taken out (wrapping around)."""

    def __init__(self, tokens: np.ndarray, eos_id: int):
        self.tokens = np.asarray(tokens)[np.asarray(tokens) != eos_id].astype(np.int64)
        if len(self.tokens) == 0:
            raise ValueError("the filler text is empty: the held-out split has no tokens besides eos")

    def take(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        start = int(rng.integers(len(self.tokens)))
        reps = -(-(start + n) // len(self.tokens))
        return np.tile(self.tokens, reps)[start:start + n] if reps > 1 else self.tokens[start:start + n]


def _fresh(pool: np.ndarray, filler: np.ndarray) -> np.ndarray:
    """Pool ids that never occur in the filler: a key seen in the text would offer a false match."""
    return np.setdiff1d(pool, filler, assume_unique=False)


def make_mqar(rng: np.random.Generator, length: int, vocab: RecallVocab, filler: Filler,
              num_pairs: int = 16) -> RecallSample:
    """[k1 v1 ... kN vN] [filler] [q1 a1 ... qN aN]: every key asked once, in random order (N answers of 1 token)."""
    gap = length - 4 * num_pairs
    if num_pairs < 1 or gap < 0:
        raise ValueError(f"mqar: length {length} cannot hold {num_pairs} pairs (needs >= 4 tokens a pair)")
    text = filler.take(rng, gap)
    keys, values = _fresh(vocab.keys, text), _fresh(vocab.values, text)
    if len(keys) < num_pairs or len(values) == 0:
        raise ValueError(f"mqar: only {len(keys)} key ids are absent from the filler, need {num_pairs}; "
                         "use fewer pairs")
    k = rng.choice(keys, num_pairs, replace=False)
    v = rng.choice(values, num_pairs, replace=len(values) < num_pairs)
    order = rng.permutation(num_pairs)
    context = np.stack([k, v], 1).reshape(-1)  # [2N]: k1 v1 k2 v2 ...
    queries = np.stack([k[order], v[order]], 1).reshape(-1)  # [2N]
    ids = np.concatenate([context, text, queries])
    first = 2 * num_pairs + gap + 1
    return RecallSample(ids.astype(np.int64), [np.array([first + 2 * i]) for i in range(num_pairs)])


def make_passkey(rng: np.random.Generator, length: int, vocab: RecallVocab, filler: Filler,
                 depth: float | None = None) -> RecallSample:
    """Filler with the needle at `depth` (a fraction; random if None), then the question; one 5-token answer."""
    gap = length - vocab.passkey_overhead
    if gap < 0:
        raise ValueError(f"passkey: length {length} is shorter than the {vocab.passkey_overhead} tokens of the "
                         "needle and the question")
    depth = float(rng.random()) if depth is None else depth
    code = [vocab.digits[d] for d in rng.integers(0, 10, PASSKEY_DIGITS)]
    text = filler.take(rng, gap)
    cut = int(round(depth * gap))
    head = [*text[:cut], *vocab.needle_head, *code, *vocab.needle_tail, *text[cut:], *vocab.question]
    ids = np.array([*head, *code, *vocab.answer_tail], dtype=np.int64)
    return RecallSample(ids, [np.arange(len(head), len(head) + PASSKEY_DIGITS)])


def make_copy(rng: np.random.Generator, length: int, vocab: RecallVocab) -> RecallSample:
    """[x1 .. xm x1 .. xm] of random ids; the answer is the second copy after its first token (which no model
    can know: nothing marks where the copy starts)."""
    m = length // 2
    if m < 2:
        raise ValueError(f"copy: length {length} is too short; need at least 4 tokens")
    half = rng.choice(vocab.ordinary, m)
    return RecallSample(np.concatenate([half, half]).astype(np.int64), [np.arange(m + 1, 2 * m)])


def make_sample(task: str, rng: np.random.Generator, length: int, vocab: RecallVocab, filler: Filler,
                **options) -> RecallSample:
    if task == "mqar":
        return make_mqar(rng, length, vocab, filler, **options)
    if task == "passkey":
        return make_passkey(rng, length, vocab, filler, **options)
    if task == "copy":
        return make_copy(rng, length, vocab)
    raise ValueError(f"unknown recall task {task!r}; choose from {list(TRAIN_TASKS)}")
