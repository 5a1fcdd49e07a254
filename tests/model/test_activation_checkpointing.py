"""Activation checkpointing (`HybridLM.set_activation_checkpointing`): every block really is recomputed in the
backward, every parameter's gradient, the losses and the metrics equal those without it (DSA in each training stage,
Gated DeltaNet, attention, MoE with either balancing), and the recomputation reports nothing a second time: no extra
auxiliary loss on `seq`, no second recall diagnostic, no MoE load counted twice."""

import pytest
import torch
import torch.utils.checkpoint

from hybrid_lm import ops
from hybrid_lm.model import HybridLM

from .helpers import tiny_model

MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, num_shared_experts=1,
           shared_expert_gate=True, first_k_dense_replace=1)
CASES = {
    "dsa-sparse": (["gated_deltanet", "dsa", "attention"], "sparse", {}),
    "dsa-dense_warmup": (["gated_deltanet", "dsa", "attention"], "dense_warmup", {}),
    "dsa-none": (["dsa", "gated_deltanet"], "none", {}),  # T > index_topk: inference-style top-k selection
    "moe-aux_loss": (["gated_deltanet", "attention", "dsa"], "sparse", {"moe": {**MOE, "aux_loss_coef": 0.1}}),
    "moe-bias": (["attention", "gated_deltanet"], "none", {"moe": {**MOE, "balancing": "bias"}}),
}


def _run(model, ids, cu, collect_metrics=True):
    """Forward + backward of loss + aux; returns the output, every gradient, the forward's `seq` (spied) and the
    number of times each block ran."""
    model.zero_grad(set_to_none=True)
    calls = [0] * len(model.layers)
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.layers)]
    seqs = []
    original = HybridLM._sequence_info

    def spy(self, *args):
        seqs.append(original(self, *args))
        return seqs[-1]

    HybridLM._sequence_info = spy
    try:
        out = model(ids, cu_seqlens=cu, labels=ids, collect_metrics=collect_metrics, return_logits=False)
        metrics_before = dict(out.metrics)
        (out.loss + out.aux_loss).backward()
    finally:
        HybridLM._sequence_info = original
        for h in hooks:
            h.remove()
    assert out.metrics == metrics_before  # the backward's recomputation wrote nothing into the returned metrics
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, seqs[0], calls


@pytest.mark.parametrize("early_stop", [True, False], ids=["early_stop", "full_recompute"])
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_recomputes_and_keeps_gradients_losses_and_reports(case, early_stop, monkeypatch):
    # torch stops a recomputation once it has every saved tensor back (early stop, the default), so the reports at
    # the end of a block may or may not run again: both ways must report once
    pattern, stage, overrides = CASES[case]
    torch.manual_seed(0)
    model = tiny_model(pattern, torch.float64, **overrides).train()
    model.set_dsa_stage(stage)
    ids, cu = torch.randint(0, 97, (1, 40)), torch.tensor([0, 13, 30, 40], dtype=torch.int32)
    recalls = []
    real_recall = ops.attention_recall
    monkeypatch.setattr(ops, "attention_recall", lambda *a, **k: recalls.append(1) or real_recall(*a, **k))

    ref, ref_grads, ref_seq, ref_calls = _run(model, ids, cu)
    ref_recalls, ref_pending = len(recalls), [getattr(m.mlp, "_pending_load", None) for m in model.layers]
    for layer in model.layers:  # a fresh count of MoE loads for the second run
        if hasattr(layer.mlp, "_pending_load"):
            layer.mlp._pending_load = None
    model.set_activation_checkpointing(True)
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        out, grads, seq, calls = _run(model, ids, cu)

    assert ref_calls == [1] * len(pattern) and calls == [2] * len(pattern)  # each block ran again in the backward
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-12, atol=1e-12)
    assert out.metrics.keys() == ref.metrics.keys()
    for key in out.metrics:
        torch.testing.assert_close(out.metrics[key], ref.metrics[key], msg=key)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    # reports once: the forward's seq holds as many aux losses as without checkpointing, even after the backward
    assert len(seq.aux_losses) == len(ref_seq.aux_losses) and not seq.recomputing
    assert len(recalls) == 2 * ref_recalls  # the recall diagnostic ran in each forward, never in a recomputation
    for ref_load, layer in zip(ref_pending, model.layers):
        load = getattr(layer.mlp, "_pending_load", None)
        assert (load is None) == (ref_load is None)
        if load is not None:  # bias balancing: one forward's expert loads, not two
            torch.testing.assert_close(load, ref_load)
            assert load.sum() == ids.numel() * MOE["num_experts_per_tok"]
    # each case exercises the reporting it checks
    assert len(seq.aux_losses) > 0 if stage != "none" or case == "moe-aux_loss" else len(seq.aux_losses) == 0
    assert ref_recalls > 0 if stage != "none" else ref_recalls == 0
    assert any(load is not None for load in ref_pending) == (case == "moe-bias")


def test_checkpointing_only_applies_with_gradients_and_without_a_cache():
    torch.manual_seed(0)
    model = tiny_model(["gated_deltanet", "dsa", "attention"], torch.float64)
    model.set_activation_checkpointing(True)
    ids = torch.randint(0, 97, (2, 20))
    ran = []
    hook = model.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :12], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                             for i in range(12, 20)]
    out = model(ids, cache=model.new_cache())  # with grad but a cache: the ordinary forward
    hook.remove()
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.logits, full)
    assert len(ran) == 1 + 1 + 8 + 1  # one call per forward, never a checkpoint recomputation
    assert out.logits.requires_grad and model.activation_checkpointing


def test_checkpointing_works_with_the_logits_path_and_bf16_autocast():
    torch.manual_seed(0)
    model = tiny_model(["gated_deltanet", "attention"], tie_word_embeddings=True)
    ids = torch.randint(0, 97, (2, 24))
    results = []
    for on in (False, True):
        model.set_activation_checkpointing(on)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], msg=name)


def test_checkpointing_only_the_first_n_blocks():
    torch.manual_seed(0)
    model = tiny_model(["gated_deltanet", "dsa", "attention", "gated_deltanet"], torch.float64).train()
    model.set_dsa_stage("sparse")
    ids, cu = torch.randint(0, 97, (1, 40)), torch.tensor([0, 13, 40], dtype=torch.int32)
    ref, ref_grads, _, ref_calls = _run(model, ids, cu)
    for n, want in ((2, [2, 2, 1, 1]), (0, [1, 1, 1, 1]), (4, [2, 2, 2, 2])):
        model.set_activation_checkpointing(n)
        out, grads, _, calls = _run(model, ids, cu)
        assert calls == want and model.checkpointed_blocks() == n, (n, calls)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-12, atol=1e-12)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    for bad in (-1, 5, 2.5, "2", None):
        with pytest.raises(ValueError, match="from 0 to num_hidden_layers = 4"):
            model.set_activation_checkpointing(bad)
    assert model.checkpointed_blocks() == 4  # a refused value leaves the setting as it was


def test_a_checkpointed_forward_tells_the_indexer_kl_it_runs_twice(monkeypatch):
    """The sparse stage's KL hears `forward_recomputed=True` in a checkpointed block's forward and in its
    recomputation (the Triton backend then keeps the gradients out of the forward), False otherwise."""
    torch.manual_seed(0)
    model = tiny_model(["dsa", "attention"], torch.float64).train()
    model.set_dsa_stage("sparse")
    ids, cu = torch.randint(0, 97, (1, 40)), torch.tensor([0, 13, 40], dtype=torch.int32)
    heard = []
    real = ops.indexer_kl_sparse
    monkeypatch.setattr(ops, "indexer_kl_sparse",
                        lambda *a, **k: heard.append(k["forward_recomputed"]) or real(*a, **k))
    _run(model, ids, cu)
    assert heard == [False]
    heard.clear()
    model.set_activation_checkpointing(True)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        _run(model, ids, cu)
    assert heard == [True, True]
