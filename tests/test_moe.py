"""Mixture-of-experts MLP (`hybrid_lm/layers/moe.py`): the grouped experts equal a per-token loop (outputs and
gradients), routing equals brute force (softmax / sigmoid / group-limited), the balancing loss equals its formula,
bias balancing moves selection but not mixture weights, and MoE models keep the model invariants (prefill + decode ==
full forward, packed == separate) and train. Shapes: `x [B, T, C]`, scores `[N, E]`, indices `[N, K]`."""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

import hybrid_lm
from hybrid_lm.config import MoEConfig
from hybrid_lm.layers.moe import MoE, _grouped_mm_available, moe_aux_loss, moe_experts, moe_route
from hybrid_lm.layers.sequence import SequenceInfo
from tests.model.helpers import prefill_then_steps, tiny_config, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, num_shared_experts=1,
           shared_expert_gate=True)
PATTERN = ["gated_deltanet", "attention", "gated_deltanet", "attention"]


def moe_layer(dtype=torch.float64, **changes):
    cfg = tiny_config(["attention"], moe={**MOE, **changes})
    layer = MoE(cfg, 0).to(dtype)
    with torch.no_grad():  # a peaked router, so the top-k choice is well separated from ties
        layer.gate.weight.normal_(0, 1.0)
    return layer


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, one chosen expert at a time, from the routing rule written out by hand."""
    s, out = layer.settings, []
    bias = getattr(layer.gate, "e_score_correction_bias", None)
    for token in x.reshape(-1, x.shape[-1]):
        logits = layer.gate.weight @ token
        scores = logits.softmax(-1) if s.scoring_func == "softmax" else logits.sigmoid()
        choice = scores + bias if bias is not None else scores
        chosen = sorted(range(s.num_experts), key=lambda e: -choice[e].item())[:s.num_experts_per_tok]
        w = scores[chosen] / (scores[chosen].sum() if s.norm_topk_prob else 1) * s.routed_scaling_factor
        y = 0
        for weight, e in zip(w, chosen):
            gate, up = (layer.experts.gate_up_proj[e] @ token).chunk(2)
            y = y + weight * (layer.experts.down_proj[e] @ (F.silu(gate) * up))
        if s.num_shared_experts:
            shared = layer.shared_expert(token)
            y = y + (torch.sigmoid(layer.shared_expert_gate(token)) * shared if s.shared_expert_gate else shared)
        out.append(y)
    return torch.stack(out).view_as(x)


def _grads(layer, fn, x):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("changes", [{}, {"scoring_func": "sigmoid", "routed_scaling_factor": 2.5},
                                     {"norm_topk_prob": False, "num_shared_experts": 0,
                                      "shared_expert_intermediate_size": 0, "shared_expert_gate": False}],
                         ids=["softmax-shared", "sigmoid-scaled", "unnormalised-no-shared"])
def test_grouped_experts_equal_per_token_loop_outputs_and_grads(changes):
    layer = moe_layer(**changes, backend="reference")
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y, dx, dp = _grads(layer, layer, x)
    y_ref, dx_ref, dp_ref = _grads(layer, lambda t: naive_moe(layer, t), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
    assert dp.keys() == dp_ref.keys()
    for name in dp:
        torch.testing.assert_close(dp[name], dp_ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.skipif(not _grouped_mm_available(torch.device("cpu"), torch.float32),
                    reason="this torch's grouped_mm does not run on CPU fp32")
def test_grouped_mm_backend_equals_reference_outputs_and_grads():
    counts = torch.tensor([3, 0, 7, 1, 5])
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    w1 = torch.randn(5, 32, 32, requires_grad=True)  # [E, 2I, C], I = 16
    w2 = torch.randn(5, 32, 16, requires_grad=True)  # [E, C, I]
    results = []
    for backend in ("reference", "grouped_mm"):
        y = moe_experts(x, w1, w2, counts, backend=backend)
        grads = torch.autograd.grad((y * y.detach().sign()).sum(), (x, w1, w2))
        results.append((y, *grads))
    for ref, fast in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="16-byte"):  # I = 3 rows are not aligned: an explicit request fails
        moe_experts(x, w1[:, :6], w2[:, :, :3], counts, backend="grouped_mm")


def _brute_force_route(scores, cfg, bias):
    """Every allowed expert set, scored exactly as the routing rule says."""
    N, E = scores.shape
    size = E // cfg.n_group
    choice = scores + bias
    picks = []
    for t in range(N):
        group_score = [sorted(choice[t, g * size:(g + 1) * size].tolist())[-2:] for g in range(cfg.n_group)]
        best_groups = max(itertools.combinations(range(cfg.n_group), cfg.topk_group),
                          key=lambda gs: sum(sum(group_score[g]) for g in gs))
        allowed = [e for e in range(E) if e // size in best_groups]
        best = max(itertools.combinations(allowed, cfg.num_experts_per_tok),
                   key=lambda es: sum(choice[t, e].item() for e in es))
        picks.append(sorted(best))
    return picks


@pytest.mark.parametrize("scoring,n_group,topk_group", [("softmax", 1, 1), ("sigmoid", 1, 1), ("sigmoid", 4, 2),
                                                        ("softmax", 2, 1)])
def test_routing_equals_brute_force(scoring, n_group, topk_group):
    cfg = MoEConfig(num_experts=8, num_experts_per_tok=3 if topk_group * 8 // n_group >= 3 else 2,
                    scoring_func=scoring, n_group=n_group, topk_group=topk_group, routed_scaling_factor=1.7)
    logits = torch.randn(40, 8, dtype=torch.float64) * 2
    bias = torch.randn(8, dtype=torch.float64) * 0.1
    weights, indices, scores = moe_route(logits, cfg, bias)
    expected_scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    torch.testing.assert_close(scores, expected_scores)
    assert [sorted(row) for row in indices.tolist()] == _brute_force_route(scores, cfg, bias)
    chosen = expected_scores.gather(1, indices)  # weights come from the unbiased scores of the chosen experts
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * 1.7)


def test_aux_loss_equals_formula_and_reaches_the_router():
    model = tiny_model(PATTERN, torch.float64, moe={**MOE, "aux_loss_coef": 0.3, "first_k_dense_replace": 1})
    ids = torch.randint(0, 97, (2, 11))
    router_inputs = {}
    for i in (1, 2, 3):  # record what each MoE layer routes
        model.layers[i].mlp.register_forward_hook(lambda m, args, out, i=i: router_inputs.__setitem__(i, args[0]))
    out = model(ids, labels=ids)
    expected = 0.0
    for i, x in router_inputs.items():
        scores = (x.reshape(-1, 32) @ model.layers[i].mlp.gate.weight.T).softmax(-1)  # [N, E]
        top = scores.topk(3, dim=-1).indices
        N, E, K = scores.shape[0], 8, 3
        f = torch.tensor([(top == e).sum().item() / N for e in range(E)], dtype=torch.float64)
        layer_loss = E / K * sum(f[e] * scores[:, e].mean() for e in range(E))
        torch.testing.assert_close(out.metrics[f"moe/layer{i}/aux_loss"], layer_loss.detach())
        expected = expected + 0.3 * layer_loss
    torch.testing.assert_close(out.aux_loss, expected)
    assert "moe/layer0/aux_loss" not in out.metrics  # layer 0 is dense (first_k_dense_replace = 1)
    out.aux_loss.backward()
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    # uniform routing scores 1 (DeepSeek-V3's normalisation); eval adds nothing to aux_loss
    uniform = torch.full((16, 8), 1 / 8)
    assert moe_aux_loss(uniform, torch.full((8,), 16 * 3 // 8), 3).item() == pytest.approx(1.0)
    model.eval()
    assert model(ids).aux_loss.item() == 0


def test_bias_balancing_moves_selection_not_mixture_weights():
    layer = moe_layer(balancing="bias", bias_update_rate=0.01)
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = x.reshape(-1, 32) @ layer.gate.weight.T
        _, plain, scores = moe_route(logits, layer.settings)
        layer.gate.e_score_correction_bias[5] = 10.0  # expert 5 now wins every selection
        weights, biased, _ = moe_route(logits, layer.settings, layer.gate.e_score_correction_bias)
        torch.testing.assert_close(layer(x), naive_moe(layer, x))
    assert (biased == 5).any(-1).all() and not torch.equal(biased, plain)
    chosen = scores.gather(1, biased)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))  # the bias never enters the weights

    # the update: loads since the last call, -rate for over-loaded experts, +rate for under-loaded ones
    params = {n: p.detach().clone() for n, p in layer.named_parameters()}
    before = layer.gate.e_score_correction_bias.clone()
    layer.train()
    seq = SequenceInfo(position_ids=torch.arange(30)[None])
    layer(x, seq)
    load = torch.zeros(8, dtype=torch.float64).index_add_(0, biased.flatten(), torch.ones(90, dtype=torch.float64))
    layer.update_balance()
    step = layer.gate.e_score_correction_bias - before
    torch.testing.assert_close(step, 0.01 * torch.sign(load.mean() - load))
    assert step[5] < 0 and "moe/layer0/aux_loss" not in seq.metrics and seq.aux_losses == []
    assert all(torch.equal(p, params[n]) for n, p in layer.named_parameters())
    layer.update_balance()  # nothing seen since: no change
    torch.testing.assert_close(layer.gate.e_score_correction_bias - before, step)


@pytest.mark.parametrize("balancing", ["aux_loss", "bias"])
def test_prefill_then_decode_equals_full_forward_with_moe(balancing):
    model = tiny_model(PATTERN, torch.float64, moe={**MOE, "balancing": balancing, "first_k_dense_replace": 1})
    if balancing == "bias":
        with torch.no_grad():
            for layer in model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    full, stepped, _ = prefill_then_steps(model, torch.randint(0, 97, (2, 21)), 8)
    torch.testing.assert_close(stepped, full, rtol=1e-9, atol=1e-9)


def test_packed_documents_equal_separate_runs_with_moe():
    model = tiny_model(PATTERN, torch.float64, moe=MOE)
    lengths = [5, 12, 1, 9]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), cu_seqlens=cu).logits
        separate = torch.cat([model(d).logits for d in docs], 1)
    torch.testing.assert_close(packed, separate, rtol=1e-9, atol=1e-9)


def test_dense_layers_first_and_flops_count_active_experts():
    model = tiny_model(PATTERN, moe={**MOE, "first_k_dense_replace": 2})
    assert [type(b.mlp).__name__ for b in model.layers] == ["SwiGLU", "SwiGLU", "MoE", "MoE"]
    expert = 3 * 32 * 16  # gate, up, down of one expert
    inactive = 2 * (8 - 3) * expert
    dense_equivalent = model.num_parameters() - 97 * 32 - inactive
    attention_part = sum(b.mixer.flops_per_token(64) for b in model.layers)
    assert model.flops_per_token(64) == pytest.approx(2 * dense_equivalent + attention_part)


def test_moe_config_round_trips_and_errors_name_the_key(tmp_path):
    cfg = tiny_config(PATTERN, moe={**MOE, "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2})
    hybrid_lm.save_config(cfg, tmp_path / "m.yaml")
    again = hybrid_lm.load_config(tmp_path / "m.yaml")
    assert again == cfg and again.moe.shared_expert_intermediate_size == 16
    data = yaml.safe_load((tmp_path / "m.yaml").read_text())
    bad = [({"typo": 1}, r"unknown key 'moe.typo'"),
           ({"num_experts_per_tok": 9}, r"moe.num_experts_per_tok = 9: must be <= num_experts = 8"),
           ({"n_group": 3}, r"moe.n_group = 3: must divide num_experts = 8"),
           ({"topk_group": 5}, r"moe.topk_group = 5: must be <= n_group = 4"),
           ({"scoring_func": "relu"}, r"moe.scoring_func = 'relu': choose one of"),
           ({"balancing": "loss"}, r"moe.balancing"),
           ({"num_experts": "8"}, r"key 'moe.num_experts' = '8' must be an integer"),
           ({"first_k_dense_replace": 4}, r"leaves no MoE layer"),
           ({"num_shared_experts": 0}, r"shared_expert_intermediate_size = 16: must be 0 exactly")]
    for change, message in bad:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**data, "moe": {**data["moe"], **change}}))
        with pytest.raises(ValueError, match=message):
            hybrid_lm.load_config(tmp_path / "bad.yaml")
    assert tiny_config(PATTERN).moe is None  # no section, no MoE


@pytest.mark.parametrize("name", ["qwen3-next-tiny", "qwen3-next-125m"])
def test_zoo_configs_build(name):
    cfg = hybrid_lm.load_config(os.path.join(ROOT, "model_configs", f"{name}.yaml"))
    model = hybrid_lm.build_model(cfg, device="meta")
    assert cfg.moe is not None and all(type(b.mlp).__name__ == "MoE" for b in model.layers)
    assert cfg.layer_types == ["gated_deltanet"] * 3 + ["attention"] + cfg.layer_types[4:]


def test_qwen3_next_tiny_trains():
    cfg = hybrid_lm.load_config(os.path.join(ROOT, "model_configs", "qwen3-next-tiny.yaml"))
    model = hybrid_lm.build_model(hybrid_lm.config_replace(cfg, vocab_size=256)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (1, 64))
    cu = torch.tensor([0, 25, 64], dtype=torch.int32)
    losses = []
    for _ in range(6):
        out = model(ids, cu_seqlens=cu, labels=ids)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert out.aux_loss > 0 and all(f"moe/layer{i}/max_load" in out.metrics for i in range(4))


def test_update_moe_balance_moves_every_bias_layer_after_training_forwards_only():
    model = tiny_model(PATTERN, moe={**MOE, "balancing": "bias", "first_k_dense_replace": 1})
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        model.eval()(ids)  # inference never counts towards balancing
    model.update_moe_balance()
    assert all(not b.mlp.gate.e_score_correction_bias.any() for b in model.layers[1:])
    model.train()(ids, labels=ids).loss.backward()
    model.update_moe_balance()
    for block in model.layers[1:]:
        bias = block.mlp.gate.e_score_correction_bias
        assert bias.abs().max() > 0 and torch.allclose(bias.abs()[bias != 0], torch.tensor(0.001))
        assert bias.grad is None and not bias.requires_grad


def test_a_frozen_router_keeps_its_balance_bias():
    # DSA's dense warm-up freezes everything but the indexers: routing must not move either
    model = tiny_model(PATTERN, moe={**MOE, "balancing": "bias", "first_k_dense_replace": 1})
    for block in model.layers[1:]:
        block.mlp.gate.weight.requires_grad_(False)
    ids = torch.randint(0, 97, (2, 16))
    model.train()(ids, labels=ids).loss.backward()
    model.update_moe_balance()
    assert all(not b.mlp.gate.e_score_correction_bias.any() for b in model.layers[1:])
    for block in model.layers[1:]:  # the frozen steps' loads were dropped, not saved for later
        block.mlp.gate.weight.requires_grad_(True)
    model.update_moe_balance()
    assert all(not b.mlp.gate.e_score_correction_bias.any() for b in model.layers[1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_grouped_mm_on_cuda_matches_the_fp32_reference(dtype):
    if not _grouped_mm_available(torch.device("cuda"), dtype):
        pytest.skip(f"this torch's grouped_mm does not run on CUDA {dtype}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.tensor([300, 0, 17, 1, 700, 6, 0, 1024], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", generator=gen)
    w1 = torch.randn(8, 2 * 128, 256, device="cuda", generator=gen) / 16  # [E, 2I, C]
    w2 = torch.randn(8, 256, 128, device="cuda", generator=gen) / 12  # [E, C, I]
    grad = torch.randn(x.shape[0], 256, device="cuda", generator=gen)
    results = []
    for backend, cast in (("reference", torch.float32), ("grouped_mm", dtype)):
        inputs = [t.to(cast).requires_grad_(True) for t in (x, w1, w2)]
        y = moe_experts(*inputs, counts, backend=backend)
        results.append((y, *torch.autograd.grad(y, inputs, grad.to(cast))))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for ref, fast in zip(*results):
        assert ((fast.float() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_model_trains_on_cuda_under_bf16_autocast():
    model = tiny_model(PATTERN, moe={**MOE, "moe_intermediate_size": 32, "balancing": "bias"}).cuda().train()
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    with torch.no_grad():
        reference = model(ids, labels=ids).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert abs(out.loss.item() - reference.item()) < 0.05
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.layers[1].mlp.parameters())
    model.update_moe_balance()
    assert model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
