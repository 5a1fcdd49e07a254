"""Model invariants for every built-in mixer and for mixed patterns: causality, prefill + decode == full forward,
packed documents == separate runs, DSA with topk >= T == dense attention, clear errors on bad input."""

import pytest
import torch

import hybrid_lm

from .helpers import prefill_then_steps, tiny_config, tiny_model

MIXERS = ["attention", "dsa", "gated_deltanet"]
PATTERNS = [[m, m] for m in MIXERS] + [["gated_deltanet", "dsa", "gated_deltanet", "attention"]]
IDS = ["-".join(p) for p in PATTERNS]


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
def test_causal(pattern):
    model = tiny_model(pattern, torch.float64)
    ids = torch.randint(0, 97, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-10)
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
def test_prefill_then_decode_equals_full_forward(pattern):
    # float64 and T > index_topk (8), so the DSA layers select during both prefill and decoding
    model = tiny_model(pattern, torch.float64)
    full, stepped, cache = prefill_then_steps(model, torch.randint(0, 97, (2, 30)), 11)
    assert cache.seq_len == 30
    torch.testing.assert_close(stepped, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_prefill_then_decode_equals_full_forward_in_each_dsa_training_stage(stage):
    # a model mid-training (e.g. sampling from a checkpoint between steps) decodes as its full forward computes;
    # the indexer's KL, a training loss over whole rows, is left out of cached steps
    model = tiny_model(["gated_deltanet", "dsa"], torch.float64)
    model.set_dsa_stage(stage)
    full, stepped, _ = prefill_then_steps(model, torch.randint(0, 97, (2, 20)), 11)
    torch.testing.assert_close(stepped, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
def test_packed_documents_equal_separate_runs(pattern):
    model = tiny_model(pattern, torch.float64)
    lengths = [7, 13, 1, 19]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), cu_seqlens=cu).logits
        separate = torch.cat([model(d).logits for d in docs], 1)
    torch.testing.assert_close(packed, separate, rtol=1e-9, atol=1e-9)


def test_packed_loss_masks_predictions_across_documents():
    model = tiny_model(["attention"], torch.float64)
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 6))
    cu = torch.tensor([0, 9, 15], dtype=torch.int32)
    ids = torch.cat([a, b], 1)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu, labels=ids).loss
        la, lb = model(a, labels=a).loss, model(b, labels=b).loss
    torch.testing.assert_close(packed, (la * 8 + lb * 5) / 13)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_dsa_with_topk_at_least_T_equals_dense_attention(kv_heads):
    dense = tiny_model(["attention", "gated_deltanet", "attention"], torch.float64, num_key_value_heads=kv_heads)
    sparse = tiny_model(["dsa", "gated_deltanet", "dsa"], torch.float64, num_key_value_heads=kv_heads,
                        mixers={"dsa": {"index_topk": 32, "index_n_heads": 2, "index_head_dim": 8,
                                        "qk_norm": True, "output_gate": True}})
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == [] and all(".indexer." in k for k in missing)
    ids = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        expected = dense(ids).logits
        torch.testing.assert_close(sparse(ids).logits, expected, rtol=1e-9, atol=1e-9)
        for stage in ("sparse", "dense_warmup"):  # selection on, but every query keeps all its keys
            sparse.set_dsa_stage(stage)
            torch.testing.assert_close(sparse(ids).logits, expected, rtol=1e-9, atol=1e-9)
    # below T the selection drops keys and the output changes
    sparse.set_dsa_stage("none")
    for layer in sparse._dsa_layers():
        layer.topk = 4
    with torch.no_grad():
        assert (sparse(ids).logits - expected).abs().max() > 1e-4


def test_dsa_training_stages_report_losses_and_route_gradients():
    model = tiny_model(["gated_deltanet", "dsa"])
    ids = torch.randint(0, 97, (1, 40))
    model.set_dsa_stage("dense_warmup")
    out = model(ids, labels=ids)
    assert set(out.metrics) == {"dsa/layer1/kl", "dsa/layer1/recall"}
    assert out.aux_loss > 0 and 0 < out.metrics["dsa/layer1/recall"] <= 1
    out.aux_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None for n, _ in model.named_parameters() if ".indexer." in n)
    assert all(grads[n] is None for n in grads if ".indexer." not in n)  # the KL reaches only the indexer

    model.zero_grad(set_to_none=True)
    model.set_dsa_stage("sparse")
    model.set_indexer_loss_weight(0.5)
    out = model(ids, labels=ids)
    out.loss.backward(retain_graph=True)
    lm_grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(lm_grads[n] is None for n in lm_grads if ".indexer." in n)  # LM loss never trains the indexer
    model.zero_grad(set_to_none=True)
    out.aux_loss.backward()
    kl_grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert kl_grads and all(".indexer." in n for n in kl_grads)  # the KL never trains the model
    assert out.metrics["dsa/layer1/recall"] < 1
    # the dense recall diagnostic can be skipped (steps that log nothing); the loss and its KL metric stay
    quiet = model(ids, labels=ids, collect_metrics=False)
    assert set(quiet.metrics) == {"dsa/layer1/kl"}
    torch.testing.assert_close(quiet.aux_loss, out.aux_loss)


def test_set_dsa_stage_errors():
    model = tiny_model(["attention"])
    with pytest.raises(ValueError, match="needs DSA layers"):
        model.set_dsa_stage("sparse")
    with pytest.raises(ValueError, match="dense_warmup"):
        tiny_model(["dsa"]).set_dsa_stage("warm")


def test_bad_token_ids_and_lengths_give_clear_errors():
    model = tiny_model(["attention"])
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings = 256"):
        model(torch.zeros(1, 257, dtype=torch.long))
    # packed documents may together exceed it: positions restart with every document
    model(torch.zeros(1, 300, dtype=torch.long), cu_seqlens=torch.tensor([0, 150, 300]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.zeros(1, 250, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match=r"input_ids must be \[1, T\]"):
        model(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]))


def test_generate_greedy_matches_argmax_of_full_forward_and_samples_reproducibly():
    model = tiny_model(["gated_deltanet", "dsa", "attention"], torch.float64)
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, max_new_tokens=12)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        logits = model(out).logits
    torch.testing.assert_close(logits[:, 4:-1].argmax(-1), out[:, 5:], rtol=0, atol=0)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


def test_save_load_round_trip(tmp_path):
    for tied in (False, True):
        model = tiny_model(["gated_deltanet", "dsa"], tie_word_embeddings=tied)
        hybrid_lm.save_model(model, tmp_path / str(tied))
        loaded = hybrid_lm.load_model(tmp_path / str(tied))
        ids = torch.randint(0, 97, (1, 20))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        hybrid_lm.load_model(tmp_path / "none")
    with pytest.raises(ValueError, match="neither"):
        hybrid_lm.load_model(tmp_path)
    model = tiny_model(["attention"])
    hybrid_lm.save_model(model, tmp_path / "m")
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        hybrid_lm.load_model(tmp_path / "m")


def test_parameter_count_and_flops():
    cfg = tiny_config(["attention", "gated_deltanet"])
    model = hybrid_lm.build_model(cfg)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.flops_per_token(1024) > model.flops_per_token(128) > 2 * (model.num_parameters() - 97 * 32) - 1


def test_output_hidden_states():
    model = tiny_model(["attention", "gated_deltanet"])
    out = model(torch.randint(0, 97, (1, 6)), output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (1, 6, 32)


@pytest.mark.parametrize("stage", ["sparse", "dense_warmup"])
def test_dsa_trains_under_cpu_bf16_autocast(stage):
    """A bf16 training step on the CPU (autocast, as the trainer runs `dtype: bfloat16`): the indexer KL's and the
    recall metric's references keep their own fp32 products, forward and backward."""
    torch.manual_seed(0)
    model = tiny_model(["dsa", "attention"])
    model.set_dsa_stage(stage)
    ids = torch.randint(0, model.config.vocab_size, (1, 48))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, collect_metrics=True)
    (out.loss + out.aux_loss).backward()
    assert 0.0 <= float(out.metrics["dsa/layer0/recall"]) <= 1.0 + 1e-6
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".indexer." in n)


@pytest.mark.parametrize("pattern, moe", [(["attention", "gated_deltanet", "dsa"], None),
                                          (["attention", "gated_deltanet"], {"num_experts": 4, "num_experts_per_tok": 2,
                                                                             "moe_intermediate_size": 16})])
def test_a_bf16_residual_stream_under_autocast(pattern, moe):
    """set_residual_dtype(bf16): under autocast every block reads and returns a bf16 stream (MoE included); the loss
    and the gradients stay close to the fp32 stream's; without autocast it changes nothing; bad dtypes are refused."""
    torch.manual_seed(0)
    model = tiny_model(pattern, **({"moe": moe} if moe else {}))
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    seen = []
    for layer in model.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))

    def step(autocast=True):
        seen.clear()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss32, grads32 = step()
    assert set(seen) == {(torch.float32, torch.float32)}
    reference = step(autocast=False)
    model.set_residual_dtype(torch.bfloat16)
    loss16, grads16 = step()
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert abs(float(loss16 - loss32)) < 1e-3 * float(loss32)
    assert float((grads16 - grads32).norm() / grads32.norm()) < 3e-2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights and their gradients stay fp32
    widen = model.layers[0].register_forward_hook(lambda mod, args, out: out.float())  # a block returning fp32
    step()
    widen.remove()
    assert seen[1][0] == torch.bfloat16  # the model casts the stream back before the next block reads it
    fp32 = step(autocast=False)  # no autocast: the setting does nothing
    assert torch.equal(fp32[0], reference[0]) and torch.equal(fp32[1], reference[1])
    with pytest.raises(ValueError, match="residual dtype"):
        model.set_residual_dtype(torch.int8)


def test_blocks_cast_the_normalised_input_once_under_autocast(monkeypatch):
    """Under autocast the residual stream stays fp32 and each block's norms hand the mixer and the feed-forward
    autocast's dtype (one cast, not one per projection): the forward is the same as casting in every projection, and
    the gradients are as close to fp32's as they were."""
    import hybrid_lm.model.block as block

    torch.manual_seed(0)
    model = tiny_model(["attention", "gated_deltanet", "dsa"])
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    seen = []
    for layer in model.layers:
        layer.mixer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
        layer.register_forward_hook(lambda mod, args, out: seen.append(("residual", out.dtype)))

    def step(autocast=True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss, grads = step()
    assert seen[:2] == [torch.bfloat16, ("residual", torch.float32)] and len(set(map(str, seen))) == 2
    _, reference = step(autocast=False)
    monkeypatch.setattr(block, "matmul_dtype", lambda x: x.dtype)  # each projection casts its fp32 input
    old_loss, old_grads = step()
    assert torch.equal(loss, old_loss)
    err = lambda g: float((g - reference).norm() / reference.norm())  # noqa: E731
    assert err(grads) < 1.1 * err(old_grads) + 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves fp64 alone
        assert [hybrid_lm.layers.matmul_dtype(torch.zeros(1, dtype=d)) for d in (torch.float64, torch.float32)] == [
            torch.float64, torch.bfloat16]
