"""Multi-head latent attention as the core of `attention` and `dsa` layers: prefill + latent-cache decoding == one
full forward, causality, packed documents == separate runs, DeepSeek's interleaved RoPE, DSA on MLA with
topk >= T == MLA attention, the indexer fed by the query latent, and strict config errors."""

import math

import pytest
import torch

from hybrid_lm.layers.mla import MLAMixin
from hybrid_lm.layers.sequence import SequenceInfo

from tests.model.helpers import tiny_config, tiny_model

MLA = dict(q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
           rope_interleave=True, qk_norm=False, output_gate=False)
MIXERS = {"attention": MLA, "dsa": {**MLA, "index_rope_dim": 4}}
PATTERNS = [["attention", "attention"], ["dsa", "dsa"], ["gated_deltanet", "dsa", "attention"]]
IDS = ["-".join(p) for p in PATTERNS]


def mla_model(pattern, dtype=torch.float64, **mixer_changes):
    mixers = {name: {**settings, **mixer_changes} for name, settings in MIXERS.items()}
    return tiny_model(pattern, dtype, mixers=mixers)


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
def test_prefill_then_latent_decode_equals_full_forward(pattern):
    # T = 30 > index_topk = 8: the DSA layers select during prefill and decoding alike
    model = mla_model(pattern)
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :11], cache=cache).logits]
        steps += [model(ids[:, i:i + 2], cache=cache).logits for i in range(11, 29, 2)]
        steps.append(model(ids[:, 29:], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    last = cache.layers[-1]
    assert "k" not in last and "v" not in last  # only the compressed latent and the rope key are cached
    assert last["latent"].data[:, :30].shape == (2, 30, 10) and last["k_rope"].data[:, :30].shape == (2, 30, 4)


def test_decoding_without_query_latent_and_with_rotate_half():
    model = mla_model(["dsa", "attention"], q_lora_rank=None, rope_interleave=False)
    assert hasattr(model.layers[0].mixer, "q_proj") and not hasattr(model.layers[0].mixer, "q_a_proj")
    assert model.layers[0].mixer.indexer.wq.in_features == 32  # no query latent: the index query reads x
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                           for i in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
def test_causal(pattern):
    model = mla_model(pattern)
    ids = torch.randint(0, 97, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-10)
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
def test_packed_documents_equal_separate_runs(pattern):
    model = mla_model(pattern)
    lengths = [7, 13, 1, 19]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), cu_seqlens=cu).logits
        separate = torch.cat([model(d).logits for d in docs], 1)
    torch.testing.assert_close(packed, separate, rtol=1e-9, atol=1e-9)


def test_mla_attention_matches_a_direct_per_head_computation():
    """Scores `(q_nope.k_nope + q_rope.k_rope) / sqrt(nope + rope)` with k_nope, v from kv_b_proj of the latent."""
    model = mla_model(["attention"])
    layer = model.layers[0].mixer
    B, T, H = 2, 9, 4
    x = torch.randn(B, T, 32, dtype=torch.float64)
    seq = SequenceInfo(position_ids=torch.arange(T).expand(B, T))
    with torch.no_grad():
        q = layer.q_b_proj(layer.q_a_layernorm(layer.q_a_proj(x))).view(B, T, H, 10)
        latent, k_rope = layer.kv_a_proj_with_mqa(x).split([10, 4], -1)
        kv = layer.kv_b_proj(layer.kv_a_layernorm(latent)).view(B, T, H, 11)
        k_nope, v = kv[..., :6], kv[..., 6:]
        q_rope, k_rope = rope_interleaved(q[..., 6:]), rope_interleaved(k_rope[:, :, None])
        s = (torch.einsum("bthd,bshd->bhts", q[..., :6], k_nope) + torch.einsum("bthd,bsd->bhts", q_rope,
                                                                                k_rope[:, :, 0])) / math.sqrt(10)
        p = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        expected = layer.o_proj(torch.einsum("bhts,bshd->bthd", p, v).flatten(2))
        torch.testing.assert_close(layer(x, seq), expected, rtol=1e-6, atol=1e-9)  # RoPE tables are fp32


def rope_interleaved(x, theta=10000.0):
    """DeepSeek's RoPE on `x [B, T, H, R]` in its own layout: dims (2i, 2i+1) rotate as one complex number."""
    T, R = x.shape[1], x.shape[-1]
    freqs = torch.arange(T, dtype=torch.float64)[:, None] / theta ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], R // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(freqs), freqs)[None, :, None]).flatten(-2)


def test_interleaved_rope_is_deepseeks_up_to_a_shared_permutation():
    model = mla_model(["attention"])
    layer: MLAMixin = model.layers[0].mixer
    x = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    seq = SequenceInfo(position_ids=torch.arange(7).expand(2, 7))
    ours = layer._mla_rope(x, seq)
    reference = rope_interleaved(x)
    torch.testing.assert_close(ours, torch.cat([reference[..., 0::2], reference[..., 1::2]], -1))


def test_dsa_on_mla_with_topk_at_least_T_equals_mla_attention():
    dense = mla_model(["attention", "gated_deltanet", "attention"])
    sparse = tiny_model(["dsa", "gated_deltanet", "dsa"], torch.float64,
                        mixers={**MIXERS, "dsa": {**MIXERS["dsa"], "index_topk": 32}})
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".indexer." in k for k in missing)
    ids = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        expected = dense(ids).logits
        for stage in ("none", "sparse", "dense_warmup"):
            sparse.set_dsa_stage(stage)
            torch.testing.assert_close(sparse(ids).logits, expected, rtol=1e-9, atol=1e-9)
        sparse.set_dsa_stage("none")
        for layer in sparse._dsa_layers():
            layer.topk = 4
        assert (sparse(ids).logits - expected).abs().max() > 1e-4


def test_indexer_reads_the_query_latent_and_trains_only_from_its_kl():
    model = mla_model(["dsa"], dtype=None)
    layer = model.layers[0].mixer
    assert layer.indexer.wq.in_features == 12  # q_lora_rank, as V3.2's wq_b
    ids = torch.randint(0, 97, (1, 40))
    model.set_dsa_stage("sparse")
    out = model(ids, labels=ids)
    out.loss.backward(retain_graph=True)
    assert all(p.grad is None for n, p in model.named_parameters() if ".indexer." in n)
    assert layer.q_a_proj.weight.grad is not None and layer.kv_b_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)
    out.aux_loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".indexer." in n for n in trained)  # the detached query latent carries no KL gradient
    assert 0 < out.metrics["dsa/layer0/recall"] < 1


def test_flops_and_parameters_follow_the_mla_dims():
    layer = mla_model(["attention"], dtype=None).layers[0].mixer
    assert layer.kv_b_proj.weight.shape == (4 * (6 + 5), 10) and layer.o_proj.weight.shape == (32, 4 * 5)
    assert layer.kv_a_proj_with_mqa.weight.shape == (10 + 4, 32) and layer.q_b_proj.weight.shape == (4 * 10, 12)
    assert layer.flops_per_token(100) == 2.0 * 50 * 4 * (10 + 5)  # q.k over nope + rope dims, p.v over v dims


@pytest.mark.parametrize("changes, match", [
    (dict(kv_lora_rank=None, qk_nope_head_dim=None, qk_rope_head_dim=None, v_head_dim=None, rope_interleave=False),
     r"q_lora_rank = 12: an MLA setting, but kv_lora_rank is null"),
    (dict(v_head_dim=None), r"v_head_dim = None: .*positive integer"),
    (dict(qk_rope_head_dim=3), r"qk_rope_head_dim = 3: .*even"),
    (dict(qk_norm=True), r"qk_norm = True: MLA normalises its latents"),
    (dict(q_lora_rank=0), r"q_lora_rank = 0"),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor = 0.5"),
])
def test_bad_mla_settings_give_clear_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(["attention"], mixers={"attention": {**MLA, **changes}})


def test_absorbed_values_are_a_view_of_the_latent_keys():
    """The sparse path hands the attention its values as a view of the keys' latent dims, which the Triton kernel
    recognises (`values_in_keys`): each gathered row is then loaded once for q.k and p.v."""
    pytest.importorskip("triton")
    from hybrid_lm.ops.triton.sparse_attention import values_in_keys

    model = mla_model(["dsa"], dtype=None)
    layer = model.layers[0].mixer
    captured = {}
    original = layer.qkv

    def spy(*args, **kwargs):
        captured["a"] = a = original(*args, **kwargs)
        return a

    layer.qkv = spy
    ids = torch.randint(0, 97, (1, 40))  # 40 > index_topk: the sparse (absorbed) path
    model.set_dsa_stage("sparse")
    model(ids, labels=ids)
    a = captured["a"]
    assert a.absorbed and a.k.shape[-1] == 10 + 4 and a.v.shape[-1] == 10  # latent + rope keys, latent values
    assert a.v.data_ptr() == a.k.data_ptr() and torch.equal(a.v, a.k[..., :10])
    assert not values_in_keys(a.k, a.v)  # 14 = 8 + 6 has no power-of-2 block of 10 dims: the padded kernel
    k = a.k.detach().new_zeros(1, 40, 1, 32 + 4).requires_grad_()  # a latent of 32 does: 36 = 32 + 16-wide tail
    assert values_in_keys(k, k[..., :32]) and not values_in_keys(k, k[..., :32].detach())
