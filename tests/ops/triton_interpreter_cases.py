"""The Triton DSA kernels against their PyTorch references on the CPU, through the Triton interpreter.

Run by tests/ops/test_triton_interpreter.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set
before the kernels are defined). The same checks as tests/gpu/, on shapes small enough for the interpreter:
indexer top-k (threshold selection with its exact fallback and tie rule, full scores + torch.topk), sparse
attention forward and backward, both indexer KL losses with their gradients, the rotary embedding and the RMSNorm
kernels. fp32 throughout (fp16 for one norm output): the interpreter has no bf16 arithmetic of its own.
Usage: python triton_interpreter_cases.py [topk|sparse|kl|rotary|norm]...
"""

from __future__ import annotations

import sys
from unittest import mock

import torch

from hybrid_lm import ops
from hybrid_lm.ops.backends import get_backend
from hybrid_lm.ops.triton import indexer_topk as it

torch.manual_seed(0)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-12)).item()


def index_inputs(T, HI=4, DI=32, Tq=None, negative_rows=0, zero_keys=1):
    Tq = T if Tq is None else Tq
    q, k, w = torch.randn(1, Tq, HI, DI), torch.randn(1, T, DI), torch.randn(1, Tq, HI)
    w[:, :negative_rows] = -w[:, :negative_rows].abs()  # these rows score <= 0: large ties at exactly 0
    if zero_keys > 1:
        k[:, ::zero_keys] = 0
    return q, k, w


def check_topk(name, q, k, w, topk, cu=None, plan=None, **kw):
    """The selection must equal the reference row for row: fp32 scores agree in order here, and the threshold
    selection breaks ties towards the earliest key like the reference. torch.topk may keep any tied keys, so for
    it only the selected scores are compared."""
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    default_plan = it.threshold_plan
    if plan is not None:
        it.threshold_plan = lambda topk: plan
    try:
        it.STATS["exact_rows"] = 0
        got = it.indexer_topk_triton(q, k, w, topk, cu_seqlens=cu_t, **kw)
    finally:
        it.threshold_plan = default_plan
    want = ops.lightning_indexer_topk(q, k, w, topk, cu_seqlens=cu_t, backend="reference")
    if kw.get("select") == "torch":
        scores = ops.lightning_indexer_scores(q, k, w, cu_seqlens=cu_t)
        got, want = (torch.where(i >= 0, scores.gather(-1, i.clamp(min=0)), float("-inf")).sort(-1).values
                     for i in (got, want))  # no documents in this check: offsets are positions
    equal = (got == want).all(-1).float().mean().item()
    print(f"topk {name}: rows equal to the reference {equal:.4f}, exact-fallback rows {it.STATS['exact_rows']}")
    assert equal == 1.0, name
    return it.STATS["exact_rows"]


def case_topk():
    q, k, w = index_inputs(300)
    check_topk("threshold", q, k, w, 64, select="threshold")
    check_topk("torch.topk", q, k, w, 64, select="torch")
    # the interpreter's time grows with the number of programs and loop steps: the other checks run the candidate
    # pass with 64-row blocks and find the k-th candidate with torch.topk (the defaults, 16-row blocks and the
    # in-kernel search, are checked above and by check_kth_search, by the sm_90 compile check and on the GPU)
    it.CANDIDATE_CONFIG, it.KTH = (64, 64, 8), "torch"
    check_topk("threshold, Tq < Tk", *index_inputs(500, Tq=200), 64, select="threshold")
    check_topk("threshold, documents", *index_inputs(400), 40, cu=[0, 30, 250, 260, 400], select="threshold")
    n = check_topk("threshold too high -> exact rows", q, k, w, 64, plan=(2, 1, 256), select="threshold")
    assert n > 100, "the forced fallback did not happen"
    n = check_topk("no threshold -> overflow -> exact rows", q, k, w, 64, plan=(2, 10**6, 128), select="threshold")
    assert n > 100, "the forced fallback did not happen"
    # every other key scores exactly 0 and half the rows only score <= 0: their top-k lies in a tie larger than
    # the candidate buffer, which only the tie cap keeps off the exact path ("grouped": the rows whose threshold is
    # 0 are sorted into blocks of their own, which rank ties, the others keep every tie; True: every block ranks)
    ties = index_inputs(400, negative_rows=200, zero_keys=2)
    default = it.RANK_TIES
    try:
        for mode in (True, "grouped"):
            it.RANK_TIES = mode
            n = check_topk(f"large ties, rank ties {mode}", *ties, 40, select="threshold")
            assert n <= 4, f"{n} rows fell back: the tie cap is not working"
        # rows with a zero threshold scattered among the others (so "grouped" reorders them), two batch rows
        q2, k2, w2 = (torch.cat(x) for x in zip(index_inputs(300, zero_keys=2), index_inputs(300, zero_keys=2)))
        neg = torch.rand(2, 300) < 0.3
        w2[neg] = -w2[neg].abs()
        for mode in (True, "grouped"):
            it.RANK_TIES = mode
            n = check_topk(f"scattered ties, batch of 2, rank ties {mode}", q2, k2, w2, 40, select="threshold")
            assert n <= 4, f"{n} rows fell back"
        check_topk("scattered ties, grouped, documents", q2[:1], k2[:1], w2[:1], 40, cu=[0, 30, 200, 210, 300],
                   select="threshold")
        it.RANK_TIES = False  # every tie kept: the rows whose ties overflow the buffer are redone exactly, still equal
        check_topk("threshold, ties kept", q, k, w, 64, select="threshold")
        n = check_topk("large ties kept -> exact rows", *ties, 40, select="threshold")
        assert n > 100, "without the tie cap the tied rows must overflow into the exact path"
    finally:
        it.RANK_TIES = default
    check_kth_search()


def check_kth_search():
    """The select kernel's in-register k-th search keeps the same candidates as torch.topk's k-th: rows with fewer
    candidates than topk, with more than the buffer, with ties at the k-th (among them -0.0 against 0.0, equal in
    the reference) and negative scores."""
    rows, cap, topk = 6, 64, 24
    vals = torch.randn(1, rows, cap)
    vals[0, 1] = vals[0, 1].round()  # many exact ties
    vals[0, 2, ::2], vals[0, 2, 1::2] = 0.0, -0.0  # a tie of zeros of both signs
    vals[0, 3] = -vals[0, 3].abs()
    offsets = torch.arange(cap, dtype=torch.int32).expand(1, rows, cap).contiguous()
    count = torch.tensor([[cap, cap, cap, 40, 10, 100]], dtype=torch.int32)  # 10 < topk; 100 > cap (overflow)
    outs = {}
    for kth in ("search", "torch"):
        outs[kth] = torch.full((1, rows, topk), -7, dtype=torch.int64)  # -7: a slot the kernel never wrote
        it.select_candidates(vals.clone(), offsets, count, 0, outs[kth], topk, kth=kth)
    equal = (outs["search"] == outs["torch"]).all(-1)
    print(f"topk k-th search: rows equal to torch.topk's k-th {equal.float().mean().item():.4f}")
    assert equal.all(), equal
    assert (outs["search"][0, 4, 10:] == -1).all() and (outs["search"][0, 2] == torch.arange(topk)).all()


def case_sparse():
    from hybrid_lm.ops.triton.sparse_attention import sparse_attention_triton

    for B, T, HQ, HKV, D, DV, K, cu in ((1, 96, 8, 2, 32, 32, 24, None), (1, 80, 4, 1, 64, 32, 16, [0, 30, 80])):
        q = torch.randn(B, T, HQ, D, requires_grad=True)
        k = torch.randn(B, T, HKV, D, requires_grad=True)
        v = torch.randn(B, T, HKV, DV, requires_grad=True)
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
        qi, ki, wi = index_inputs(T, HI=2, DI=16)
        idx = ops.lightning_indexer_topk(qi, ki, wi, K, cu_seqlens=cu_t, backend="reference")
        if cu is not None:  # slots in any order, -1 among them: the key loops stop after the last valid slot
            idx = idx.gather(-1, torch.rand(idx.shape).argsort(-1))
        scale = D ** -0.5
        o, lse = sparse_attention_triton(q, k, v, idx, scale=scale, cu_seqlens=cu_t, return_lse=True)
        do, dlse = torch.randn_like(o), torch.randn_like(lse)
        grads = torch.autograd.grad([o, lse], [q, k, v], [do, dlse])
        o_r, lse_r = ops.sparse_attention(q, k, v, idx, scale=scale, cu_seqlens=cu_t, return_lse=True,
                                          backend="reference")
        grads_r = torch.autograd.grad([o_r, lse_r], [q, k, v], [do, dlse])
        errs = [rel_err(o, o_r), rel_err(lse, lse_r)] + [rel_err(g, gr) for g, gr in zip(grads, grads_r)]
        print(f"sparse attention HQ={HQ} HKV={HKV} cu={cu}: rel. errors o, lse, dq, dk, dv " +
              " ".join(f"{e:.1e}" for e in errs))
        assert max(errs) < 1e-4
    check_split_head_dim_and_shared_values()


def check_split_head_dim_and_shared_values():
    """Head dims that are not a power of 2 run as a main block plus a tail (96 = 64 + 32, MLA's 288 = 256 + 32), and
    values that are a view of the keys' first dims (MLA's latent) are gathered once, their gradient added into the
    keys'."""
    from hybrid_lm.ops.triton import sparse_attention as sa

    assert sa.SPLIT_HEAD_DIM  # the default
    assert sa.split_head_dim(96) == (64, 32) and sa.split_head_dim(288) == (256, 32)
    assert sa.split_head_dim(576) == (512, 64) and sa.split_head_dim(128) == (128, 0)
    assert sa.split_head_dim(200) == (256, 0)  # 128 + 128 would not be narrower
    T, K = 72, 16
    qi, ki, wi = index_inputs(T, HI=2, DI=16)
    idx = ops.lightning_indexer_topk(qi, ki, wi, K, backend="reference")
    for name, HQ, D, DV, shared in (("split 96 = 64 + 32", 6, 96, 64, False), ("MLA: v = k[..., :32], D 48", 4, 48,
                                                                               32, True)):
        q = torch.randn(1, T, HQ, D, requires_grad=True)
        k = torch.randn(1, T, 1, D, requires_grad=True)
        v = k[..., :DV] if shared else torch.randn(1, T, 1, DV, requires_grad=True)
        assert sa.values_in_keys(k, v) == shared and not sa.values_in_keys(k, v.detach())
        leaves = [q, k] if shared else [q, k, v]
        # the op routes CPU tensors away from triton: the interpreter runs the backend function directly
        got = sa.sparse_attention_triton(q, k, v, idx, scale=D ** -0.5, return_lse=True)
        want = ops.sparse_attention(q, k, v, idx, return_lse=True, backend="reference")
        outs = [list(ol) + list(torch.autograd.grad(ol, leaves, [torch.ones_like(ol[0]).cos(),
                                                                  torch.ones_like(ol[1])])) for ol in (got, want)]
        errs = [rel_err(a, b) for a, b in zip(*outs)]
        print(f"sparse attention {name}: rel. errors o, lse, grads " + " ".join(f"{e:.1e}" for e in errs))
        assert max(errs) < 1e-4, name


def case_kl():
    from hybrid_lm.ops.triton import indexer_kl as kl_kernels

    for name in ("indexer_kl_dense", "indexer_kl_sparse"):
        for cu in (None, [0, 40, 96]):
            T, HQ, HKV, D = 96, 4, 1, 32
            q, k = torch.randn(1, T, HQ, D), torch.randn(1, T, HKV, D)
            leaves = [x.requires_grad_() for x in index_inputs(T, HI=2, DI=16)]
            cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
            extra = {}
            if name == "indexer_kl_sparse":
                idx = ops.lightning_indexer_topk(*[x.detach() for x in leaves], 24, cu_seqlens=cu_t,
                                                 backend="reference")
                if cu is not None:  # shuffled slots, -1 among them
                    idx = idx.gather(-1, torch.rand(idx.shape).argsort(-1))
                lse = ops.sparse_attention(q, k, k, idx, scale=D ** -0.5, cu_seqlens=cu_t, return_lse=True,
                                           backend="reference")[1]  # the sparse stage reads p from it
                extra = {"indices": idx, "attn_lse": lse}
            ref = get_backend(name, "reference")
            loss_r = ref(q, k, *leaves, **extra, scale=D ** -0.5, cu_seqlens=cu_t, block=32)
            grads_r = torch.autograd.grad(loss_r, leaves)
            # the sparse stage in two sweeps (loss, then gradients) and in one (gradients in the forward)
            for one_sweep in (False, True) if name == "indexer_kl_sparse" else (False,):
                with mock.patch.object(kl_kernels, "SPARSE_ONE_SWEEP", one_sweep), mock.patch.object(
                        kl_kernels, "_sparse_launch", wraps=kl_kernels._sparse_launch) as launch:
                    def passes():  # the sweeps run since the last look (pass_ is the 10th argument)
                        got = [int(c.args[9]) for c in launch.call_args_list]
                        launch.reset_mock()
                        return got

                    loss = get_backend(name, "triton")(q, k, *leaves, **extra, scale=D ** -0.5, cu_seqlens=cu_t,
                                                       block=32)
                    grads = torch.autograd.grad(3.0 * loss, leaves)  # a scaled upstream gradient
                    with_grad = passes()
                    with torch.no_grad():  # no gradients wanted: the loss alone
                        loss_ng = get_backend(name, "triton")(q, k, *leaves, **extra, scale=D ** -0.5,
                                                              cu_seqlens=cu_t, block=32)
                    no_grad = passes()
                    if name == "indexer_kl_sparse":  # a forward that checkpointing runs twice: two sweeps
                        loss_rc = get_backend(name, "triton")(q, k, *leaves, **extra, scale=D ** -0.5,
                                                              cu_seqlens=cu_t, block=32, forward_recomputed=True)
                        grads_rc = torch.autograd.grad(loss_rc, leaves)
                        recomputed = passes()
                        assert recomputed == [int(kl_kernels.LOSS), int(kl_kernels.GRADS)], (one_sweep, recomputed)
                        assert max(rel_err(g, gr) for g, gr in zip(grads_rc, grads_r)) < 1e-4
                if name == "indexer_kl_sparse":
                    want = [kl_kernels.LOGITS, kl_kernels.ONE_SWEEP] if one_sweep else [
                        kl_kernels.LOSS, kl_kernels.GRADS]
                    assert with_grad == [int(x) for x in want], (one_sweep, with_grad)
                    assert no_grad == [int(kl_kernels.LOSS)], (one_sweep, no_grad)  # never gradients under no_grad
                errs = [rel_err(loss, loss_r), rel_err(loss_ng, loss_r)] + [
                    rel_err(g, 3.0 * gr) for g, gr in zip(grads, grads_r)]
                print(f"{name} cu={cu}{' one sweep' if one_sweep else ''}: loss {loss.item():.5f} vs "
                      f"{loss_r.item():.5f}; rel. errors loss, loss without grad, d q_idx, d k_idx, d weights "
                      + " ".join(f"{e:.1e}" for e in errs))
                assert max(errs) < 1e-4


def case_rotary():
    """The rotary kernel against the reference: partial and full rotation, strided x (a slice of a wider tensor),
    fp32; values and gradients (the backward kernel is the transposed rotation)."""
    from hybrid_lm.layers.rope import rope_cos_sin
    from hybrid_lm.ops.triton.rotary import rotary_triton

    for B, T, H, D, R in ((2, 19, 3, 16, 16), (1, 33, 5, 24, 8), (1, 7, 2, 64, 32)):
        wide = torch.randn(B, T, H, D + 6)
        x = wide[..., 3:3 + D].clone().requires_grad_() if R < D else wide[..., :D].requires_grad_()
        pos = torch.randint(0, 1000, (B, T))
        cos, sin = rope_cos_sin(pos, R, 10000.0)
        g = torch.randn(B, T, H, D)
        y = rotary_triton(x, cos, sin)
        (dx,) = torch.autograd.grad(y, x, g)
        y_r = ops.rotary(x, cos, sin, backend="reference")
        (dx_r,) = torch.autograd.grad(y_r, x, g)
        errs = [rel_err(y, y_r), rel_err(dx, dx_r)]
        print(f"rotary B={B} T={T} H={H} D={D} R={R}: rel. errors y, dx " + " ".join(f"{e:.1e}" for e in errs))
        assert max(errs) < 1e-6


def case_norm():
    """The RMSNorm kernels against torch's F.rms_norm: D a power of 2 and not, rows that fill several tiles and
    several backward programs (each keeps a dw partial), 3-d inputs, an fp32 input with an fp16 output (the
    interpreter has no bf16); values and the gradients of x and the weight."""
    from hybrid_lm.ops.triton.norm import rms_norm_triton

    for shape, out_dtype in (((3, 37, 64), torch.float32), ((301, 24), torch.float32), ((2, 50, 100), torch.float16),
                             ((4000, 8), torch.float32), ((1, 5, 1024), torch.float32)):
        x = (torch.randn(*shape) * 3).requires_grad_()
        w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
        g = torch.randn(*shape)
        y = rms_norm_triton(x, w, 1e-6, out_dtype)
        dx, dw = torch.autograd.grad(y, (x, w), g.to(out_dtype))
        y_r = ops.rms_norm(x, w, 1e-6, out_dtype, backend="reference")
        dx_r, dw_r = torch.autograd.grad(y_r, (x, w), g.to(out_dtype))
        assert y.dtype == out_dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
        errs = [rel_err(y, y_r), rel_err(dx, dx_r), rel_err(dw, dw_r)]
        print(f"rms_norm {shape} -> {out_dtype}: rel. errors y, dx, dw " + " ".join(f"{e:.1e}" for e in errs))
        assert max(errs) < (1e-3 if out_dtype == torch.float16 else 1e-5)


CASES = {"topk": case_topk, "sparse": case_sparse, "kl": case_kl, "rotary": case_rotary, "norm": case_norm}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CASES):
        CASES[name]()
    print("ok")
