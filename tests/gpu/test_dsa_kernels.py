"""Triton DSA kernels (hybrid_lm/ops/triton) against the CPU-semantics references, on fresh random inputs.

Sparse attention: outputs, lse and gradients (through o and lse) vs the fp32 reference on the same bf16 inputs,
by relative Frobenius error. Indexer top-k: compared through scores (ties may come in any order): the right
number of valid slots, distinct visible keys, ascending positions and the same top-k values as the brute force.
"""

import pytest
import torch

from hybrid_lm import ops
from hybrid_lm.ops import backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BF16 = torch.bfloat16


def poison_allocator(mb=256):
    """Leave NaN bytes in the caching allocator so an output the kernel never writes cannot pass as zeros."""
    junk = torch.full((mb << 18,), float("nan"), device="cuda")
    del junk


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def doc_starts(T, cu):
    starts = torch.zeros(T, dtype=torch.long, device="cuda")
    if cu is not None:
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            starts[s:e] = s
    return starts


def random_indices(B, Tq, Tk, K, cu=None, empty_rows=(), gen=None):
    """Distinct causal index sets [B, Tq, K] (stratified sampling), -1 padded, slots shuffled."""
    t = torch.arange(Tq, device="cuda")
    starts = doc_starts(Tq, cu)
    n = (Tk - Tq + t - starts + 1)[None, :, None].expand(B, Tq, 1)  # visible keys per row
    j = torch.arange(K, device="cuda")[None, None, :]
    u = torch.rand(B, Tq, K, device="cuda", generator=gen)
    full = ((j + u) * n / K).floor().long().clamp(max=n - 1)
    idx = torch.where(n > K, full, torch.where(j < n, j, -1))
    perm = torch.rand(B, Tq, K, device="cuda", generator=gen).argsort(-1)
    idx = idx.gather(-1, perm)
    for r in empty_rows:
        idx[:, r] = -1
    return idx


SPARSE_CASES = [
    # B, Tq, Tk, HQ, HKV, D, DV, K, cu_seqlens
    (2, 256, 256, 16, 1, 128, 128, 64, None),  # MQA (V3.2's layout)
    (1, 200, 200, 16, 4, 128, 128, 100, None),  # GQA, K not a multiple of the key block
    (2, 128, 128, 4, 4, 64, 32, 32, None),  # MHA, DV != D
    (1, 300, 300, 8, 2, 128, 128, 64, [0, 1, 90, 300]),  # packed documents
    (1, 64, 512, 16, 1, 128, 128, 128, None),  # Tq < Tk (bottom-right)
    (1, 160, 160, 6, 2, 96, 64, 48, None),  # odd head count and head dim
]


@pytest.mark.parametrize("B, Tq, Tk, HQ, HKV, D, DV, K, cu", SPARSE_CASES)
def test_sparse_attention_matches_reference(B, Tq, Tk, HQ, HKV, D, DV, K, cu):
    gen = torch.Generator(device="cuda").manual_seed(Tq * 7 + K)
    q = torch.randn(B, Tq, HQ, D, device="cuda", generator=gen).to(BF16)
    k = torch.randn(B, Tk, HKV, D, device="cuda", generator=gen).to(BF16)
    v = torch.randn(B, Tk, HKV, DV, device="cuda", generator=gen).to(BF16)
    cu_t = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)
    idx = random_indices(B, Tq, Tk, K, cu_t, empty_rows=(3,), gen=gen)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    poison_allocator()
    o, lse = ops.sparse_attention(*leaves, idx, cu_seqlens=cu_t, return_lse=True, backend="triton")
    ref_leaves = [x.float().requires_grad_() for x in (q, k, v)]
    ro, rl = ops.sparse_attention(*ref_leaves, idx, cu_seqlens=cu_t, return_lse=True, backend="reference")
    assert o.dtype == BF16 and lse.dtype == torch.float32
    finite = torch.isfinite(rl)
    assert torch.equal(finite, torch.isfinite(lse)), "rows with no key must give lse = -inf, and only those"
    assert not finite[:, 3].any() and (o[:, 3] == 0).all()
    do = torch.randn(ro.shape, device="cuda", generator=gen)
    dl = torch.randn(rl.shape, device="cuda", generator=gen)
    ((o.float() * do).sum() + torch.where(finite, lse * dl, 0).sum()).backward()
    ((ro * do).sum() + torch.where(finite, rl * dl, 0).sum()).backward()
    errs = {"o": rel_err(o, ro), "lse": rel_err(lse[finite], rl[finite])}
    errs.update({f"d{n}": rel_err(a.grad, b.grad) for n, a, b in zip("qkv", leaves, ref_leaves)})
    print("sparse_attention rel errors", (B, Tq, Tk, HQ, HKV, D, DV, K, cu), {n: f"{e:.1e}" for n, e in errs.items()})
    assert errs["o"] < 1e-2 and errs["lse"] < 1e-4
    assert errs["dq"] < 2e-2 and errs["dk"] < 2e-2 and errs["dv"] < 2e-2


def test_sparse_attention_without_lse_grad_and_auto_picks_triton():
    dev = torch.device("cuda")
    assert backends.resolve_backend("sparse_attention", "auto", dev, BF16) == "triton"
    assert backends.resolve_backend("lightning_indexer_topk", "auto", dev, BF16) == "triton"
    assert backends.resolve_backend("sparse_attention", "auto", dev, torch.float32) == "reference"
    q = torch.randn(1, 128, 8, 64, device="cuda", dtype=BF16, requires_grad=True)
    kv = torch.randn(1, 128, 1, 64, device="cuda", dtype=BF16, requires_grad=True)
    idx = random_indices(1, 128, 128, 40)
    o = ops.sparse_attention(q, kv, kv, idx)  # k and v are one tensor: their gradients add up
    o.float().square().sum().backward()
    qr, kvr = q.detach().float().requires_grad_(), kv.detach().float().requires_grad_()
    ops.sparse_attention(qr, kvr, kvr, idx, backend="reference").square().sum().backward()
    assert rel_err(o, ops.sparse_attention(qr, kvr, kvr, idx, backend="reference")) < 1e-2
    assert rel_err(q.grad, qr.grad) < 2e-2 and rel_err(kv.grad, kvr.grad) < 2e-2


@pytest.mark.parametrize("HQ, D, DV", [(12, 288, 256), (16, 576, 512), (6, 96, 64)])
def test_sparse_attention_mla_latent_values_and_split_head_dims(HQ, D, DV, monkeypatch):
    """MLA's absorbed form (values = a view of the keys' first DV dims, gathered once, one gradient scatter) and
    head dims split into a power-of-2 block plus a tail (288 = 256 + 32, 576 = 512 + 64), against the reference."""
    from hybrid_lm.ops.triton import sparse_attention as sa

    monkeypatch.setattr(sa, "SPLIT_HEAD_DIM", True)  # the default; benchmarks may switch it off
    gen = torch.Generator(device="cuda").manual_seed(D)
    T, K = 256, 64
    q = torch.randn(1, T, HQ, D, device="cuda", generator=gen).to(BF16).requires_grad_()
    k = torch.randn(1, T, 1, D, device="cuda", generator=gen).to(BF16).requires_grad_()
    v = k[..., :DV]
    assert sa.values_in_keys(k, v)  # SPARSE_CASES covers a split head dim (96) with separate values
    idx = random_indices(1, T, T, K, gen=gen)
    o, lse = ops.sparse_attention(q, k, v, idx, return_lse=True, backend="triton")
    qr, kr = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    ro, rl = ops.sparse_attention(qr, kr, kr[..., :DV], idx, return_lse=True, backend="reference")
    do = torch.randn(ro.shape, device="cuda", generator=gen)
    ((o.float() * do).sum() + lse.sum()).backward()
    ((ro * do).sum() + rl.sum()).backward()
    errs = {"o": rel_err(o, ro), "lse": rel_err(lse, rl), "dq": rel_err(q.grad, qr.grad), "dk": rel_err(k.grad, kr.grad)}
    print("sparse_attention MLA", (HQ, D, DV), {n: f"{e:.1e}" for n, e in errs.items()})
    assert errs["o"] < 1e-2 and errs["lse"] < 1e-4 and errs["dq"] < 2e-2 and errs["dk"] < 2e-2


def test_select_kernel_kth_search_equals_torch_kth():
    """The select kernel's in-register k-th search keeps exactly the candidates torch.topk's k-th keeps: rows with
    fewer candidates than topk, overflowing ones, ties at the k-th (-0.0 against 0.0 among them)."""
    from hybrid_lm.ops.triton import indexer_topk as it

    gen = torch.Generator(device="cuda").manual_seed(5)
    rows, cap, topk = 64, 4096, 2048
    vals = torch.randn(1, rows, cap, device="cuda", generator=gen)
    vals[0, 1] = vals[0, 1].round()
    vals[0, 2, ::2], vals[0, 2, 1::2] = 0.0, -0.0
    vals[0, 3] = -vals[0, 3].abs()
    offsets = torch.arange(cap, device="cuda", dtype=torch.int32).expand(1, rows, cap).contiguous()
    count = torch.randint(topk - 100, cap + 100, (1, rows), device="cuda", generator=gen, dtype=torch.int32)
    count[0, :4] = cap
    count[0, 4] = 10
    outs = {}
    for kth in ("search", "torch"):
        outs[kth] = torch.full((1, rows, topk), -7, device="cuda", dtype=torch.int64)
        it.select_candidates(vals.clone(), offsets, count, 0, outs[kth], topk, kth=kth)
    assert torch.equal(outs["search"], outs["torch"])
    assert (outs["search"][0, 4, 10:] == -1).all() and (outs["search"] != -7).all()


def make_index_inputs(B, Tq, Tk, HI, DI, dtype, gen):
    q = torch.randn(B, Tq, HI, DI, device="cuda", generator=gen).to(dtype)
    k = torch.randn(B, Tk, DI, device="cuda", generator=gen).to(dtype)
    w = torch.randn(B, Tq, HI, device="cuda", generator=gen)  # negative weights change the ranking
    return q, k, w


def check_topk(idx, scores, topk, starts):
    """idx [B, Tq, topk] (offsets from starts) against fp32 brute-force scores [B, Tq, Tk] (-inf = invisible)."""
    B, Tq, Tk = scores.shape
    assert idx.shape == (B, Tq, topk) and idx.dtype == torch.long
    n = torch.isfinite(scores).sum(-1).clamp(max=topk)  # [B, Tq]
    valid = idx >= 0
    slot = torch.arange(topk, device="cuda")
    assert torch.equal(valid, slot < n[..., None]), "valid entries first, exactly min(topk, visible) of them"
    pos = torch.where(valid, idx + starts[None, :, None], 0)
    assert (pos < Tk).all()
    vals = torch.where(valid, scores.gather(-1, pos), float("-inf"))
    assert torch.isfinite(vals[valid]).all(), "a selected key is not visible"
    marked = torch.where(valid, pos, -1 - slot).sort(-1).values
    assert (marked.diff(dim=-1) != 0).all(), "a key was selected twice"
    tol = 1e-4 * scores[torch.isfinite(scores)].abs().max().item() + 1e-5
    pair = valid[..., 1:]
    assert ((pos[..., 1:] > pos[..., :-1]) | ~pair).all(), "valid indices not in ascending position"
    kk = min(topk, Tk)
    best = scores.topk(kk, dim=-1).values
    best = torch.cat([best, best.new_full((B, Tq, topk - kk), float("-inf"))], -1)
    vals = vals.sort(dim=-1, descending=True).values
    assert ((vals - best).abs() <= tol)[valid].all(), "a better key was left out"


# threshold selection with the candidate pass's non-default tie modes (indexer_topk.RANK_TIES)
TIE_MODES = {"threshold-keep-ties": False, "threshold-rank-ties": True}

INDEX_CASES = [
    # B, Tq, Tk, HI, DI, topk, dtype, cu_seqlens
    (2, 300, 300, 4, 64, 64, BF16, None),
    (1, 50, 400, 4, 64, 32, BF16, None),  # Tq < Tk
    (1, 333, 333, 4, 32, 40, BF16, [0, 10, 11, 200, 333]),  # documents shorter than topk
    (1, 100, 100, 4, 64, 128, BF16, None),  # topk > T: every row keeps all it sees
    (1, 257, 257, 3, 32, 16, torch.float32, None),  # fp32, odd head count
    (1, 4096, 4096, 4, 64, 2048, BF16, None),  # V3.2's topk on long rows
    # longer rows than the threshold selection's candidate buffer (2 topk rounded up to a power of 2)
    (2, 1500, 1500, 4, 64, 256, BF16, None),
    (1, 600, 2000, 4, 64, 256, BF16, None),  # Tq < Tk
    (1, 2500, 2500, 4, 64, 256, BF16, [0, 700, 1900, 1950, 2500]),  # documents shorter and longer than CAP
    (1, 1200, 1200, 2, 32, 300, torch.float32, None),  # fp32, topk not a power of 2
]


@pytest.mark.parametrize("select", ["auto", "threshold", *TIE_MODES])
@pytest.mark.parametrize("B, Tq, Tk, HI, DI, topk, dtype, cu", INDEX_CASES)
def test_indexer_topk_matches_brute_force(B, Tq, Tk, HI, DI, topk, dtype, cu, select, monkeypatch):
    from hybrid_lm.ops.triton import indexer_topk as it
    from hybrid_lm.ops.triton.indexer_topk import indexer_topk_triton

    if select in TIE_MODES:  # the candidate pass's other ways with ties (the default is "grouped")
        monkeypatch.setattr(it, "RANK_TIES", TIE_MODES[select])
        select = "threshold"

    gen = torch.Generator(device="cuda").manual_seed(Tq + topk)
    q, k, w = make_index_inputs(B, Tq, Tk, HI, DI, dtype, gen)
    cu_t = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)
    poison_allocator()
    if select == "auto":  # through the op, as the model calls it
        idx = ops.lightning_indexer_topk(q, k, w, topk, cu_seqlens=cu_t, backend="triton")
    else:
        idx = indexer_topk_triton(q, k, w, topk, cu_seqlens=cu_t, select=select)
    scores = ops.lightning_indexer_scores(q.float(), k.float(), w, cu_seqlens=cu_t)
    check_topk(idx, scores, topk, doc_starts(Tq, cu_t))


@pytest.mark.parametrize("select", ["radix", "radix11"])
@pytest.mark.parametrize("B, Tq, Tk, HI, DI, topk, dtype, cu", INDEX_CASES[1:])
def test_radix_select_matches_brute_force(B, Tq, Tk, HI, DI, topk, dtype, cu, select):
    from hybrid_lm.ops.triton.indexer_topk import indexer_topk_triton

    gen = torch.Generator(device="cuda").manual_seed(Tq + topk)
    q, k, w = make_index_inputs(B, Tq, Tk, HI, DI, dtype, gen)
    cu_t = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)
    idx = indexer_topk_triton(q, k, w, topk, cu_seqlens=cu_t, select=select)
    scores = ops.lightning_indexer_scores(q.float(), k.float(), w, cu_seqlens=cu_t)
    check_topk(idx, scores, topk, doc_starts(Tq, cu_t))


@pytest.mark.parametrize("select", ["torch", "radix", "threshold", *TIE_MODES])
def test_indexer_topk_chunked_rows_and_ties(select, monkeypatch):
    from hybrid_lm.ops.triton import indexer_topk as it
    from hybrid_lm.ops.triton.indexer_topk import indexer_topk_triton

    if select in TIE_MODES:  # the candidate pass's other ways with ties (the default is "grouped")
        monkeypatch.setattr(it, "RANK_TIES", TIE_MODES[select])
        select = "threshold"

    gen = torch.Generator(device="cuda").manual_seed(5)
    B, T, topk = 2, 600, 200
    q, k, w = make_index_inputs(B, T, T, 4, 64, BF16, gen)
    k[:, 1::2] = 0  # half the keys score exactly 0: the k-th largest often sits inside a tie
    idx = indexer_topk_triton(q, k, w, topk, score_budget=B * T * 37, select=select)  # 37-row chunks
    check_topk(idx, ops.lightning_indexer_scores(q.float(), k.float(), w), topk, torch.zeros(T, device="cuda").long())


@pytest.mark.parametrize("plan", [(4, 1, 1024), (4, 10**6, 1024)], ids=["threshold-too-high", "no-threshold"])
def test_threshold_selection_falls_back_to_exact_rows(monkeypatch, plan):
    """A threshold above the k-th score (too few candidates) or none at all (more than CAP candidates): the rows
    it misses are redone exactly, so the result stays right."""
    from hybrid_lm.ops.triton import indexer_topk as it

    monkeypatch.setattr(it, "threshold_plan", lambda topk: plan)
    gen = torch.Generator(device="cuda").manual_seed(11)
    B, T, topk = 2, 2000, 300
    q, k, w = make_index_inputs(B, T, T, 4, 64, BF16, gen)
    idx = it.indexer_topk_triton(q, k, w, topk, select="threshold")
    check_topk(idx, ops.lightning_indexer_scores(q.float(), k.float(), w), topk, torch.zeros(T, device="cuda").long())


def test_threshold_selection_equals_reference_on_exact_ties():
    """Keys scoring exactly 0 tie; the threshold selection keeps the earliest tied keys like the reference."""
    from hybrid_lm.ops.triton.indexer_topk import indexer_topk_triton

    gen = torch.Generator(device="cuda").manual_seed(12)
    T, topk = 3000, 512
    q, k, w = make_index_inputs(1, T, T, 4, 64, BF16, gen)
    w = w.abs()  # scores >= 0: zero keys and keys every head's relu zeroes score exactly 0, so rows shorter
    k[:, ::3] = 0  # than ~800 tokens have their k-th score inside a tie at 0
    got = indexer_topk_triton(q, k, w, topk, select="threshold")
    want = ops.lightning_indexer_topk(q.float(), k.float(), w, topk, backend="reference")
    assert (got == want).all(-1).float().mean() > 0.99


@pytest.mark.parametrize("mode", [True, "grouped"])
def test_threshold_selection_keeps_large_ties_on_the_fast_path(mode, monkeypatch):
    """Rows whose weights are all negative (here a random 30%, among ordinary rows) score <= 0, with thousands of
    keys tied at exactly 0 (more than CAP): only the tied keys that can still be selected become candidates, so
    none of those rows needs the exact fallback, and the earliest ties are kept, as the reference keeps them.
    Their thresholds are 0, so "grouped" (the default) gathers them into row blocks that rank ties and True ranks
    ties in every block. With a quarter of the keys zeroed, some mixed-sign rows (few positive scores) also draw a
    threshold of 0 while having more than topk positive keys: the ties they keep before enough positive keys have
    been seen can overflow CAP (run 14 on an H100 before the tie bound counted those keys: 182 of 4,096 rows; a CPU
    model of the rule gives ~34 after), and only those may fall back."""
    from hybrid_lm.ops.triton import indexer_topk as it

    monkeypatch.setattr(it, "RANK_TIES", mode)
    fell_back = []
    exact = it.exact_rows
    monkeypatch.setattr(it, "exact_rows", lambda q, k, w, lo, hi, rows, *a: fell_back.append(rows[:, 1].clone())
                        or exact(q, k, w, lo, hi, rows, *a))
    gen = torch.Generator(device="cuda").manual_seed(13)
    T, topk = 4096, 256
    q, k, w = make_index_inputs(1, T, T, 4, 64, BF16, gen)
    negative = torch.rand(T, device="cuda", generator=gen) < 0.3
    w = torch.where(negative[None, :, None], -w.abs(), w)
    k[:, ::4] = 0
    got = it.indexer_topk_triton(q, k, w, topk, select="threshold")
    rows = torch.cat(fell_back) if fell_back else torch.zeros(0, dtype=torch.long, device="cuda")
    assert not negative[rows].any()  # no all-negative row: without the tie cap each one past ~2,000 tokens fell back
    assert rows.numel() <= T // 50
    want = ops.lightning_indexer_topk(q.float(), k.float(), w, topk, backend="reference")
    assert (got == want).all(-1).float().mean() > 0.99


def test_dsa_with_topk_at_least_T_equals_dense_attention():
    gen = torch.Generator(device="cuda").manual_seed(9)
    T = 200
    q_idx, k_idx, w = make_index_inputs(1, T, T, 4, 64, BF16, gen)
    idx = ops.lightning_indexer_topk(q_idx, k_idx, w, 256)
    q = torch.randn(1, T, 8, 128, device="cuda", generator=gen).to(BF16)
    k = torch.randn(1, T, 2, 128, device="cuda", generator=gen).to(BF16)
    v = torch.randn(1, T, 2, 128, device="cuda", generator=gen).to(BF16)
    out = ops.sparse_attention(q, k, v, idx)
    ref = ops.attention(q.float(), k.float(), v.float(), backend="reference")
    assert rel_err(out, ref) < 1e-2
