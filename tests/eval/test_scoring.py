"""Scoring: teacher-forced recall agrees with greedy decoding, perplexity with a hand computation, and the DSA
top-k knob is exact when it keeps every key."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hybrid_lm
from hybrid_lm.eval.scoring import dsa_topk, perplexity, recall_correct
from hybrid_lm.eval.tasks import RecallSample


@pytest.fixture(scope="module")
def model(model_yamls):
    torch.manual_seed(0)
    cfg = hybrid_lm.config_replace(hybrid_lm.load_config(model_yamls["gdn-dsa"]), vocab_size=64)
    return hybrid_lm.build_model(cfg).eval()


class _Oracle(torch.nn.Module):
    """Predicts the true next token of the sequences it was built with (shifted by `shift` ids)."""

    def __init__(self, vocab, shift=0):
        super().__init__()
        self.vocab, self.shift = vocab, shift

    def forward(self, ids):
        nxt = torch.roll(ids, -1, dims=1)
        return SimpleNamespace(logits=F.one_hot((nxt + self.shift) % self.vocab, self.vocab).float())


def test_recall_counts_answers_right_and_wrong():
    rng = np.random.default_rng(0)
    samples = [RecallSample(rng.integers(0, 50, 40), [np.array([5]), np.array([10, 11, 12])]) for _ in range(5)]
    assert recall_correct(_Oracle(50), samples, batch_tokens=64) == (10, 10)
    assert recall_correct(_Oracle(50, shift=1), samples, batch_tokens=64) == (0, 10)


def test_teacher_forced_answer_is_right_exactly_when_greedy_decoding_produces_it(model):
    torch.manual_seed(1)
    prompts = torch.randint(0, 64, (3, 20))
    greedy = model.generate(prompts, max_new_tokens=4)  # [3, 24]
    samples = []
    for row in greedy:
        samples.append(RecallSample(row.numpy().copy(), [np.arange(20, 24)]))
        wrong = row.numpy().copy()
        wrong[22] = (wrong[22] + 1) % 64  # one token off: greedy would not produce it
        samples.append(RecallSample(wrong, [np.arange(20, 24)]))
    right, asked = recall_correct(model, samples, batch_tokens=48)
    assert (right, asked) == (3, 6)
    assert recall_correct(model, samples[::2]) == (3, 3)


def test_perplexity_matches_a_hand_computation(model):
    text = np.random.default_rng(0).integers(0, 64, 500)
    out = perplexity(model, text, 48, max_tokens=300, batch_tokens=100)  # 6 windows over 3 forward passes
    assert out["windows"] == 6 and out["tokens"] == 288
    ids = torch.from_numpy(text[:288].reshape(6, 48))
    with torch.no_grad():
        nll = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    nll = nll.view(6, 47)
    assert out["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert out["tail_loss"] == pytest.approx(float(nll[:, 23:].mean()), rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]))
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, text[:40], 48, max_tokens=300)


def test_topk_covering_every_key_equals_dense_attention_and_is_restored(model):
    ids = torch.randint(0, 64, (2, 40))
    layer = model._dsa_layers()[0]
    assert layer.topk == 16
    with torch.no_grad():
        with dsa_topk(model, 64):  # >= T: the dense path
            dense = model(ids).logits
        with dsa_topk(model, 40):  # = T: sparse selection of every causal key
            layer.topk = 40
            every = model(ids).logits
        with dsa_topk(model, 4):
            assert layer.topk == 4
            sparse = model(ids).logits
    assert layer.topk == 16
    torch.testing.assert_close(every, dense, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sparse, dense, atol=1e-4)  # keeping 4 keys of 40 changes the outputs


def test_topk_sweep_needs_dsa_layers(model_yamls):
    cfg = hybrid_lm.config_replace(hybrid_lm.load_config(model_yamls["gdn"]), vocab_size=64)
    with pytest.raises(ValueError, match="needs DSA layers"):
        with dsa_topk(hybrid_lm.build_model(cfg), 8):
            pass
