"""Optimizer groups (no decay on norms, biases, embeddings) and the warmup / cosine / WSD schedules."""

import math

import pytest
import torch

import hybrid_lm
from hybrid_lm.training.config import OptimConfig
from hybrid_lm.training.optim import LRSchedule, build_optimizer, build_scheduler, param_groups

from .conftest import TINY_MODEL


def test_weight_decay_only_on_matrices():
    model = hybrid_lm.build_model(hybrid_lm.config_from_dict(dict(TINY_MODEL)))
    groups = param_groups(model.named_parameters(), weight_decay=0.1)
    by_id = {id(p): name for name, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in groups[0]["params"]}
    plain = {by_id[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed | plain == set(by_id.values()) and not decayed & plain
    for name in decayed:
        p = dict(model.named_parameters())[name]
        assert p.ndim >= 2 and not any(k in name for k in ("embed", "norm", "bias")), name
    assert "embed_tokens.weight" in plain  # tied with lm_head: listed once, undecayed
    assert any(n.endswith("mlp.gate_proj.weight") for n in decayed)
    assert all(n in plain for n in by_id.values() if "norm" in n or dict(model.named_parameters())[n].ndim < 2)


def test_frozen_parameters_are_left_out():
    lin = torch.nn.Linear(3, 3)
    lin.bias.requires_grad_(False)
    opt = build_optimizer(lin.named_parameters(), OptimConfig(), torch.device("cpu"))
    assert [p for g in opt.param_groups for p in g["params"]] == [lin.weight]
    lin.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(lin.named_parameters(), OptimConfig(), torch.device("cpu"))


def test_cosine_schedule_shape():
    f = LRSchedule("cosine", lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)          # half way down the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_schedule_is_flat_then_decays_linearly_to_min():
    f = LRSchedule("wsd", lr=2.0, min_lr=0.2, warmup_steps=5, total_steps=100, decay_fraction=0.2)
    assert f(0) == pytest.approx(0.2)
    assert all(f(s) == 1.0 for s in range(5, 80))
    decay = [f(s) for s in range(80, 100)]
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert all(d == pytest.approx(steps[0]) for d in steps) and steps[0] > 0
    assert f(99) == pytest.approx(0.1) and f(150) == pytest.approx(0.1)  # min_lr / lr


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = OptimConfig(lr=0.5, min_lr=0.05, warmup_steps=2, schedule="cosine")
    opt = build_optimizer([("w", p)], cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total_steps=10)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.5 * LRSchedule("cosine", 0.5, 0.05, 2, 10)(s) for s in range(12)]
    assert seen == pytest.approx(expected)
    assert seen[-1] == pytest.approx(0.05) and not math.isnan(seen[-1])
