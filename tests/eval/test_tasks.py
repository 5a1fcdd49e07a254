"""Recall task generators: every answer is what a brute-force lookup of the sample says it must be."""

import numpy as np
import pytest

from hybrid_lm.data import load_tokenizer
from hybrid_lm.eval.tasks import PASSKEY_DIGITS, Filler, RecallVocab, make_copy, make_mqar, make_passkey, make_sample


@pytest.fixture(scope="module")
def vocab(prepared):
    tok, _ = load_tokenizer(prepared.tokenizer_path)
    return RecallVocab.from_tokenizer(tok, prepared.vocab_size, [prepared.eos_id])


@pytest.fixture(scope="module")
def filler(prepared):
    return Filler(prepared.val, prepared.eos_id)


@pytest.mark.parametrize("length,pairs", [(64, 4), (200, 16), (120, 30)])
def test_mqar_answers_are_the_values_of_the_queried_keys(vocab, filler, length, pairs):
    rng = np.random.default_rng(1)
    s = make_mqar(rng, length, vocab, filler, num_pairs=pairs)
    ids = s.input_ids
    assert len(ids) == length and len(s.answers) == pairs
    keys, values = ids[:2 * pairs:2], ids[1:2 * pairs:2]
    assert len(set(keys.tolist())) == pairs and set(keys.tolist()) <= set(vocab.keys.tolist())
    text = ids[2 * pairs:length - 2 * pairs]
    assert not set(keys.tolist()) & set(text.tolist())  # no false match in the filler
    asked = []
    for (p,) in s.answers:
        query = ids[p - 1]
        first = int(np.flatnonzero(ids == query)[0])  # brute force: where the key was given
        assert first < 2 * pairs and first % 2 == 0
        assert ids[p] == ids[first + 1]
        asked.append(int(query))
    assert sorted(asked) == sorted(keys.tolist())  # every key asked exactly once


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, None])
def test_passkey_answer_repeats_the_needle(vocab, filler, depth):
    s = make_passkey(np.random.default_rng(2), 150, vocab, filler, depth=depth)
    ids = s.input_ids.tolist()
    assert len(ids) == 150 and len(s.answers) == 1 and len(s.answers[0]) == PASSKEY_DIGITS
    head = list(vocab.needle_head)
    start = next(i for i in range(len(ids)) if ids[i:i + len(head)] == head) + len(head)
    code = ids[start:start + PASSKEY_DIGITS]
    assert all(t in vocab.digits for t in code)
    assert [ids[p] for p in s.answers[0]] == code
    question = list(vocab.question)
    assert ids[s.answers[0][0] - len(question):s.answers[0][0]] == question
    if depth == 0.0:
        assert start == len(head)


def test_copy_second_half_repeats_the_first(vocab):
    s = make_copy(np.random.default_rng(3), 41, vocab)
    m = 20
    assert np.array_equal(s.input_ids[:m], s.input_ids[m:])
    assert s.answers[0].tolist() == list(range(m + 1, 2 * m))


def test_samples_are_reproducible_and_filler_has_no_eos(vocab, filler, prepared):
    a = make_sample("mqar", np.random.default_rng([0, 1]), 128, vocab, filler, num_pairs=4)
    b = make_sample("mqar", np.random.default_rng([0, 1]), 128, vocab, filler, num_pairs=4)
    assert np.array_equal(a.input_ids, b.input_ids)
    long = filler.take(np.random.default_rng(0), 3 * len(filler.tokens))  # wraps around
    assert len(long) == 3 * len(filler.tokens) and prepared.eos_id not in long


def test_bad_requests_raise_value_errors(vocab, filler):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="cannot hold"):
        make_mqar(rng, 30, vocab, filler, num_pairs=8)
    with pytest.raises(ValueError, match="shorter than"):
        make_passkey(rng, 10, vocab, filler)
    with pytest.raises(ValueError, match="unknown recall task"):
        make_sample("needle", rng, 100, vocab, filler)


def test_pool_size_sets_the_key_and_value_pools(prepared, filler):
    tok, _ = load_tokenizer(prepared.tokenizer_path)
    small = RecallVocab.from_tokenizer(tok, prepared.vocab_size, [prepared.eos_id], pool_size=8)
    assert len(small.keys) == len(small.values) == 8 and not set(small.keys) & set(small.values)
    s = make_mqar(np.random.default_rng(0), 32, small, filler, num_pairs=8)  # every key of the pool, once
    assert sorted(s.input_ids[:16:2].tolist()) == sorted(small.keys.tolist())
    assert set(s.input_ids[1:16:2].tolist()) <= set(small.values.tolist())
    with pytest.raises(ValueError, match="pool_size"):
        RecallVocab.from_tokenizer(tok, prepared.vocab_size, [prepared.eos_id], pool_size=4)
