"""sparse_attention(): against dense attention and a masked dense brute force (outputs, lse, gradients)."""

import importlib

import pytest
import torch

from hybrid_lm.ops import attention, sparse_attention

sp_mod = importlib.import_module("hybrid_lm.ops.sparse_attention")


def rand_qkv(B, Tq, Tk, HQ, HKV, D=8, DV=6, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Tk, HKV, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Tk, HKV, DV, generator=g, dtype=torch.float64)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def random_indices(B, Tq, Tk, K, seed=0, empty_rows=()):
    """Distinct causal keys per query (bottom-right aligned), padded with -1, shuffled order."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, Tq, K), -1, dtype=torch.long)
    for b in range(B):
        for t in range(Tq):
            if t in empty_rows:
                continue
            visible = Tk - Tq + t + 1
            n = int(torch.randint(1, min(K, visible) + 1, (1,), generator=g))
            chosen = torch.randperm(visible, generator=g)[:n]
            slots = torch.randperm(K, generator=g)[:n]
            idx[b, t, slots] = chosen
    return idx


def brute_force(q, k, v, idx, scale=None):
    """Dense scores with a [B, Tq, Tk] mask built from the index sets; empty rows give 0 / -inf."""
    B, Tq, HQ, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    mask = torch.zeros(B, Tq, Tk + 1, dtype=torch.bool)
    mask.scatter_(2, torch.where(idx < 0, Tk, idx), True)
    mask = mask[..., :Tk]
    kr, vr = k.repeat_interleave(HQ // HKV, 2), v.repeat_interleave(HQ // HKV, 2)
    s = torch.einsum("bqhd,bkhd->bqhk", q, kr) * scale
    s = s.masked_fill(~mask[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)
    return torch.einsum("bqhk,bkhd->bqhd", p, vr), lse


@pytest.mark.parametrize("B, Tq, Tk, HQ, HKV", [(2, 9, 9, 4, 4), (2, 5, 12, 6, 2), (1, 7, 7, 4, 1)])
def test_all_causal_keys_equals_dense_attention(B, Tq, Tk, HQ, HKV):
    q, k, v = rand_qkv(B, Tq, Tk, HQ, HKV)
    pos = torch.arange(Tk)
    q_pos = torch.arange(Tk - Tq, Tk)
    idx = torch.where(pos[None, :] <= q_pos[:, None], pos[None, :], -1).expand(B, Tq, Tk)
    out = sparse_attention(q, k, v, idx)
    torch.testing.assert_close(out, attention(q, k, v, backend="reference"))


@pytest.mark.parametrize("B, Tq, Tk, HQ, HKV, K", [(2, 10, 10, 4, 2, 4), (1, 6, 15, 3, 1, 5), (2, 8, 8, 2, 2, 12)])
def test_random_subsets_match_brute_force(B, Tq, Tk, HQ, HKV, K, monkeypatch):
    monkeypatch.setattr(sp_mod, "QUERY_CHUNK", 3)
    q, k, v = rand_qkv(B, Tq, Tk, HQ, HKV, seed=K)
    idx = random_indices(B, Tq, Tk, K, seed=K, empty_rows=(2,))
    out, lse = sparse_attention(q, k, v, idx, scale=0.4, return_lse=True)
    ref, ref_lse = brute_force(q, k, v, idx, scale=0.4)
    assert out.shape == (B, Tq, HQ, v.shape[-1]) and lse.shape == (B, Tq, HQ)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    assert (out[:, 2] == 0).all() and torch.isneginf(lse[:, 2]).all()


def test_minus_one_entries_are_ignored():
    q, k, v = rand_qkv(1, 6, 6, 2, 2)
    idx = random_indices(1, 6, 6, 3, seed=1)
    padded = torch.cat([torch.full((1, 6, 2), -1), idx, torch.full((1, 6, 1), -1)], dim=-1)
    torch.testing.assert_close(sparse_attention(q, k, v, padded), sparse_attention(q, k, v, idx))


def test_fp32_keeps_dtype_and_lse_is_fp32():
    q, k, v = (t.float() for t in rand_qkv(1, 6, 6, 2, 1))
    idx = random_indices(1, 6, 6, 3)
    out, lse = sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    out32 = sparse_attention(q, k, v, idx)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), brute_force(q.double(), k.double(), v.double(), idx)[0])


def test_cu_seqlens_uses_offsets_within_documents(monkeypatch):
    monkeypatch.setattr(sp_mod, "QUERY_CHUNK", 2)
    lengths = [5, 0, 7, 3]
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = rand_qkv(1, T, T, 4, 2, seed=3)
    parts = [random_indices(1, n, n, 4, seed=n) for n in lengths if n]
    idx = torch.cat(parts, dim=1)
    out, lse = sparse_attention(q, k, v, idx, cu_seqlens=cu, return_lse=True)
    for (s, e), part in zip([(s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s], parts):
        o_doc, l_doc = sparse_attention(q[:, s:e], k[:, s:e], v[:, s:e], part, return_lse=True)
        torch.testing.assert_close(out[:, s:e], o_doc)
        torch.testing.assert_close(lse[:, s:e], l_doc)


@pytest.mark.parametrize("HQ, HKV", [(4, 2), (3, 1)])
def test_gradients_match_brute_force(HQ, HKV, monkeypatch):
    monkeypatch.setattr(sp_mod, "QUERY_CHUNK", 3)  # rematerialised blocks
    q, k, v = rand_qkv(2, 7, 10, HQ, HKV, grad=True, seed=HQ)
    idx = random_indices(2, 7, 10, 4, seed=HQ, empty_rows=(1,))
    do = torch.randn(2, 7, HQ, v.shape[-1], dtype=q.dtype)
    dlse = torch.randn(2, 7, HQ, dtype=q.dtype)
    out, lse = sparse_attention(q, k, v, idx, return_lse=True)
    ref, ref_lse = brute_force(q, k, v, idx)
    loss = (out * do).sum() + (torch.where(torch.isfinite(lse), lse, 0) * dlse).sum()
    ref_loss = (ref * do).sum() + (torch.where(torch.isfinite(ref_lse), ref_lse, 0) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_bad_indices_raise():
    q, k, v = rand_qkv(1, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="indices"):
        sparse_attention(q, k, v, torch.full((1, 4, 2), 4))
    with pytest.raises(ValueError, match="indices"):
        sparse_attention(q, k, v, torch.full((1, 4, 2), -2))
    with pytest.raises(ValueError, match="integer"):
        sparse_attention(q, k, v, torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match=r"\[B, Tq, K\]"):
        sparse_attention(q, k, v, torch.zeros(1, 3, 2, dtype=torch.long))
    # packed: offsets are per document; offset 2 in the first, 2-token document would read the next one's key
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    inside = torch.tensor([[[0, -1], [0, 1], [0, -1], [1, 0]]])
    assert torch.isfinite(sparse_attention(q, k, v, inside, cu_seqlens=cu)).all()
    with pytest.raises(ValueError, match="own document"):
        sparse_attention(q, k, v, torch.tensor([[[2, -1], [0, 1], [0, -1], [1, 0]]]), cu_seqlens=cu)
