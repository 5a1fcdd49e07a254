"""Lightning indexer scores and top-k against brute force (sets of indices, -1 padding, documents)."""

import importlib

import pytest
import torch

from hybrid_lm.ops import lightning_indexer_scores, lightning_indexer_topk

idx_mod = importlib.import_module("hybrid_lm.ops.indexer")


def make(B, Tq, Tk, HI=4, DI=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, HI, DI, generator=g, dtype=dtype)
    k = torch.randn(B, Tk, DI, generator=g, dtype=dtype)
    w = torch.randn(B, Tq, HI, generator=g, dtype=dtype)  # negative weights change the ranking
    return q, k, w


def brute_scores(q, k, w, doc=None):
    """Triple loop-free but independent formula: broadcast products, no einsum."""
    q, k, w = q.double(), k.double(), w.double()
    dots = (q[:, :, :, None, :] * k[:, None, None, :, :]).sum(-1)  # [B, Tq, HI, Tk]
    s = (w[..., None] * dots.clamp(min=0)).sum(2)  # [B, Tq, Tk]
    Tq, Tk = q.shape[1], k.shape[1]
    visible = torch.arange(Tk)[None, :] <= torch.arange(Tk - Tq, Tk)[:, None]
    if doc is not None:
        visible &= doc[None, :] == doc[-Tq:, None]
    return s.masked_fill(~visible, float("-inf"))


def check_topk(idx, scores, topk, base=None, tol=1e-4):
    """Each row: valid entries first, distinct visible keys in position order, none beaten by a left-out key.

    Compared through scores rather than index sets, so exact ties (keys whose relu terms are
    all zero score exactly 0) may come in any order.
    """
    B, Tq, Tk = scores.shape
    assert idx.shape == (B, Tq, topk) and idx.dtype == torch.long
    for b in range(B):
        for t in range(Tq):
            row = scores[b, t]
            n = min(topk, int(torch.isfinite(row).sum()))
            got = idx[b, t]
            assert (got[n:] == -1).all() and (got[:n] >= 0).all()
            chosen = got[:n] + (0 if base is None else base[t])
            assert len(set(chosen.tolist())) == n
            vals = row[chosen]
            assert torch.isfinite(vals).all()
            assert (got[:n].diff() > 0).all(), "valid indices not in ascending position"
            left_out = row.clone()
            left_out[chosen] = float("-inf")
            if n:
                assert left_out.max() <= vals.min() + tol
            assert torch.allclose(vals.sort(descending=True).values, row.topk(n).values, atol=tol)


def test_scores_match_brute_force():
    q, k, w = make(2, 5, 9)
    out = lightning_indexer_scores(q, k, w)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 9)
    torch.testing.assert_close(out.double(), brute_scores(q, k, w), atol=1e-5, rtol=1e-5)


def test_scores_bf16_inputs_give_fp32():
    q, k, w = make(1, 6, 6)
    out = lightning_indexer_scores(q.bfloat16(), k.bfloat16(), w.bfloat16())
    assert out.dtype == torch.float32


@pytest.mark.parametrize("B, Tq, Tk, topk", [(2, 11, 11, 4), (2, 4, 13, 5), (1, 1, 9, 3), (1, 7, 7, 20)])
def test_topk_matches_brute_force(B, Tq, Tk, topk):
    q, k, w = make(B, Tq, Tk, seed=Tq + Tk)
    idx = lightning_indexer_topk(q, k, w, topk)
    check_topk(idx, brute_scores(q, k, w), topk)


def test_early_rows_are_padded_with_minus_one():
    q, k, w = make(1, 6, 6)
    idx = lightning_indexer_topk(q, k, w, 4)
    for t in range(3):  # query t sees t + 1 keys
        assert (idx[0, t, t + 1:] == -1).all() and (idx[0, t, :t + 1] >= 0).all()


def test_topk_crosses_query_blocks(monkeypatch):
    monkeypatch.setattr(idx_mod, "QUERY_CHUNK", 3)
    q, k, w = make(2, 20, 26, seed=3)
    idx = lightning_indexer_topk(q, k, w, 6)
    check_topk(idx, brute_scores(q, k, w), 6)
    monkeypatch.setattr(idx_mod, "SCORE_BUDGET", 1)  # forces one query row per block
    check_topk(lightning_indexer_topk(q, k, w, 6), brute_scores(q, k, w), 6)


def test_topk_with_cu_seqlens_gives_offsets_within_documents(monkeypatch):
    monkeypatch.setattr(idx_mod, "QUERY_CHUNK", 2)
    lengths = [4, 0, 7, 1, 6]
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    q, k, w = make(1, T, T, seed=7)
    idx = lightning_indexer_topk(q, k, w, 3, cu_seqlens=cu)
    check_topk(idx, brute_scores(q, k, w, doc=doc), 3, base=cu[:-1][doc])
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            alone = lightning_indexer_topk(q[:, s:e], k[:, s:e], w[:, s:e], 3)
            check_topk(alone, brute_scores(q[:, s:e], k[:, s:e], w[:, s:e]), 3)
            assert ((idx[:, s:e] == -1) == (alone == -1)).all()
    scores = lightning_indexer_scores(q, k, w, cu_seqlens=cu.int())
    torch.testing.assert_close(scores.double(), brute_scores(q, k, w, doc=doc), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise():
    q, k, w = make(1, 5, 5)
    with pytest.raises(ValueError, match="topk"):
        lightning_indexer_topk(q, k, w, 0)
    with pytest.raises(ValueError, match="Tq"):
        lightning_indexer_topk(q, k[:, :3], w, 2)
    with pytest.raises(ValueError, match="disagree"):
        lightning_indexer_topk(q, k, w[:, :, :2], 2)
    with pytest.raises(ValueError, match="B == 1"):
        lightning_indexer_topk(*make(2, 5, 5), 2, cu_seqlens=torch.tensor([0, 5]))
