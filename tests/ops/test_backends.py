"""Backend registry: auto choices, explicit-backend errors, registration and logging."""

import logging
import subprocess
import sys

import pytest
import torch

from hybrid_lm import ops
from hybrid_lm.ops import backends

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "op, expected",
    [
        ("attention", "sdpa"),
        ("gated_delta_rule", "reference"),
        ("causal_conv1d", "reference"),
        ("lightning_indexer_topk", "reference"),
        ("sparse_attention", "reference"),
    ],
)
def test_auto_on_cpu(op, expected):
    assert backends.resolve_backend(op, "auto", CPU, torch.float32) == expected
    assert backends.resolve_backend(op, "auto", CPU, torch.bfloat16) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_flash_attn_on_cpu_raises_helpful_error():
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError) as err:
        ops.attention(q, q, q, backend="flash_attn")
    msg = str(err.value)
    assert "attention" in msg and "flash_attn" in msg and "CUDA" in msg and "sdpa" in msg


@pytest.mark.parametrize("op", ["gated_delta_rule", "causal_conv1d"])
def test_fla_on_cpu_raises_helpful_error(op):
    with pytest.raises(ValueError) as err:
        backends.resolve_backend(op, "fla", CPU, torch.bfloat16)
    msg = str(err.value)
    assert op in msg and "'fla'" in msg and "CUDA" in msg and "reference" in msg


def test_fla_through_the_op_raises():
    x = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="fla"):
        ops.causal_conv1d(x, torch.randn(3, 4), backend="fla")
    q = torch.randn(1, 4, 2, 8)
    g = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="fla"):
        ops.gated_delta_rule(q, q, q, g, g, backend="fla")


def test_unknown_backend_and_op_raise():
    with pytest.raises(ValueError, match="unknown backend 'nope'.*reference"):
        backends.resolve_backend("sparse_attention", "nope", CPU, torch.float32)
    with pytest.raises(ValueError, match="unknown op"):
        backends.resolve_backend("no_such_op", "auto", CPU, torch.float32)


def test_registered_backend_wins_auto_and_is_called(monkeypatch):
    op = "lightning_indexer_topk"
    monkeypatch.setitem(backends._REGISTRY, op, dict(backends._REGISTRY[op]))
    calls = []

    def fake_topk(q_idx, k_idx, weights, topk, *, cu_seqlens=None):
        calls.append(topk)
        return torch.zeros(q_idx.shape[0], q_idx.shape[1], topk, dtype=torch.long)

    backends.register_backend(
        "lightning_indexer_topk", "fake", fake_topk, available=lambda device, dtype: dtype == torch.float32,
        priority=100, requires="fp32 inputs",
    )
    q, k, w = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 2)
    assert ops.lightning_indexer_topk(q, k, w, 3).shape == (1, 5, 3) and calls == [3]
    # Unavailable for bf16: auto falls back to the reference, an explicit request is an error.
    assert backends.resolve_backend("lightning_indexer_topk", "auto", CPU, torch.bfloat16) == "reference"
    with pytest.raises(ValueError, match="fp32 inputs"):
        backends.resolve_backend("lightning_indexer_topk", "fake", CPU, torch.bfloat16)


def test_supports_hook_rejects_a_call(monkeypatch, caplog):
    monkeypatch.setitem(backends._REGISTRY, "sparse_attention", dict(backends._REGISTRY["sparse_attention"]))
    monkeypatch.setattr(backends, "_LOGGED", set())
    backends.register_backend(
        "sparse_attention", "picky", lambda *a, **k: None, priority=5,
        supports=lambda f: None if f.get("head_dim") == 64 else "needs head_dim 64",
    )
    choice = backends.resolve_backend("sparse_attention", "auto", CPU, torch.float32, features={"head_dim": 64})
    assert choice == "picky"
    with caplog.at_level(logging.WARNING, logger="hybrid_lm"):
        choice = backends.resolve_backend("sparse_attention", "auto", CPU, torch.float32, features={"head_dim": 32})
    assert choice == "reference"
    assert any("picky" in r.getMessage() and "needs head_dim 64" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="needs head_dim 64"):
        backends.resolve_backend("sparse_attention", "picky", CPU, torch.float32, features={"head_dim": 32})


def test_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="hybrid_lm"):
        for _ in range(3):
            backends.resolve_backend("causal_conv1d", "auto", CPU, torch.float32)
    records = [r for r in caplog.records if "causal_conv1d" in r.getMessage()]
    assert len(records) == 1 and "reference" in records[0].getMessage()


def test_detection_on_this_machine_is_consistent():
    assert backends.has_flash_attn() in (None, "fa2", "fa4")
    assert isinstance(backends.has_fla(), bool) and isinstance(backends.has_triton(), bool)


def test_import_does_no_optional_imports():
    code = (
        "import sys, hybrid_lm.ops; "
        "bad = [m for m in ('fla', 'flash_attn', 'triton') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
