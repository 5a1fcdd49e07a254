"""Evaluation: perplexity at several context lengths, synthetic long-context recall (MQAR, passkey), DSA top-k
sweeps (`runner.evaluate`, `hybrid-lm eval`), and the hybrid comparison recipe (`compare.run_comparison`,
`train/compare.py`).

Imports point one way: this package uses `hybrid_lm.model`, `hybrid_lm.data` and `hybrid_lm.training`.
"""

from .mix import MixConfig, RecallMix, write_recall_mix
from .runner import EVAL_TASKS, EvalConfig, evaluate
from .scoring import dsa_topk, perplexity, recall_correct
from .tasks import TASKS, Filler, RecallSample, RecallVocab, make_copy, make_mqar, make_passkey, make_sample

__all__ = ["EvalConfig", "EVAL_TASKS", "evaluate", "MixConfig", "RecallMix", "write_recall_mix", "recall_correct",
           "perplexity", "dsa_topk", "TASKS", "RecallSample", "RecallVocab", "Filler", "make_mqar", "make_passkey",
           "make_copy", "make_sample"]
