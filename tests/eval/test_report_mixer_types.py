"""The comparison report: models are classified by the mixers behind their layer names."""

from pathlib import Path

import hybrid_lm
from hybrid_lm.data import DataConfig
from hybrid_lm.eval.report import ordering_check
from hybrid_lm.eval.runner import EvalConfig, _summary

TINY = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            intermediate_size=64, max_position_embeddings=256,
            mixers={"gated_deltanet": {"num_heads": 2, "head_k_dim": 16, "head_v_dim": 16},
                    "local": {"type": "attention", "sliding_window": 64}})


def _summary_of(layers: list[str], accuracy: float) -> dict:
    cfg = hybrid_lm.config_from_dict({**TINY, "layer_types": layers, "num_hidden_layers": len(layers)}, "<test>")
    record = {"cell": {"task": "mqar", "length": 128, "topk": None}, "accuracy": accuracy}
    return _summary(hybrid_lm.build_model(cfg), Path("m"), EvalConfig(), DataConfig(), None, [], [record])


def test_an_aliased_attention_layer_makes_a_gdn_hybrid():
    gdn = _summary_of(["gated_deltanet", "gated_deltanet"], 0.1)
    local = _summary_of(["gated_deltanet", "local"], 0.9)  # `local` is an attention layer with a sliding window
    (line,) = ordering_check({"gdn": gdn, "gdn-local": local})
    assert "gdn-local 0.90" in line and line.endswith("**yes**")  # was "(needs at least one ... GDN hybrid ...)"
    assert local["model"]["mixer_types"] == ["gated_deltanet", "attention"]
