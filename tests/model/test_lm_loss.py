"""The chunked LM head + cross-entropy (`hybrid_lm/model/loss.py`): loss and gradients equal `F.cross_entropy` of the
full logits (fp32, fp64, bf16 autocast; chunk sizes that do not divide N; ignored targets; nothing scored), it never
holds an `[N, V]` tensor, and `HybridLM.forward(..., return_logits=False)` equals the logits path (packed documents,
tied embeddings, several rows). Shapes: `hidden [N, H]`, `weight [V, H]`, `targets [N]`."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hybrid_lm.model.loss import LinearCrossEntropy, default_chunk_size, linear_cross_entropy, next_token_targets

from .helpers import tiny_model

N, H, V = 37, 16, 50


def _inputs(dtype=torch.float32, ignored=(3, 7, 36), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[list(ignored)] = -100
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets, scale=1.0):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets)
    (loss * scale).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def _reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, N, 1000, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradients_equal_cross_entropy_of_the_full_logits(chunk_size, dtype):
    hidden, weight, targets = _inputs(dtype)
    ref = _loss_and_grads(_reference, hidden, weight, targets, scale=2.5)
    got = _loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=chunk_size),
                          hidden, weight, targets, scale=2.5)
    # the reference takes the log-softmax in fp32 even for fp64 inputs; ours keeps fp64 there
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[0].to(ref[0].dtype), ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    torch.testing.assert_close(got[2], ref[2], **tol)
    assert got[1].dtype == got[2].dtype == dtype


def test_bf16_autocast_matches_the_autocast_head():
    hidden, weight, targets = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(_reference, hidden, weight, targets)
        got = _loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=6), hidden, weight, targets)
        one = _loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=N), hidden, weight, targets)
    fp32 = _loss_and_grads(_reference, hidden, weight, targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    # one chunk: the same bf16 matmuls as the autocast nn.Linear, so the same numbers
    torch.testing.assert_close(one[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one[1], ref[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one[2], ref[2], rtol=1e-6, atol=1e-6)
    for a, b in zip(got, ref):  # chunks round the weight gradient to bf16 per chunk: bf16 tolerance
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
    # and the bf16 logits really were used: the fp32 head differs by more than rounding of the sum
    assert (got[0] - fp32[0]).abs() > 1e-6


def test_ignored_targets_get_no_gradient_and_nothing_scored_matches_cross_entropy():
    hidden, weight, targets = _inputs(ignored=(0, 5))
    _, gh, _ = _loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=4), hidden, weight, targets)
    assert gh[[0, 5]].abs().max() == 0 and gh[1].abs().max() > 0
    none = torch.full((N,), -100)
    ref = _loss_and_grads(_reference, hidden, weight, none)
    got = _loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=4), hidden, weight, none)
    assert ref[0].isnan() and got[0].isnan()  # the mean over no targets, 0/0, as F.cross_entropy gives
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b)


def test_no_grad_and_partial_grads():
    hidden, weight, targets = _inputs()
    ref = _reference(hidden, weight, targets).detach()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_size=4), ref)
    frozen = weight.detach()
    hidden.grad = None
    loss = linear_cross_entropy(hidden, frozen, targets, chunk_size=4)
    assert loss.grad_fn.saved_tensors[1] is None  # no weight gradient computed for a frozen head
    loss.backward()
    hidden.grad, expected = None, hidden.grad
    _reference(hidden, frozen, targets).backward()
    torch.testing.assert_close(expected, hidden.grad)


def test_saves_only_the_input_sized_gradients():
    hidden, weight, targets = _inputs()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert type(loss.grad_fn).__name__ == LinearCrossEntropy.__name__ + "Backward"
    assert [tuple(t.shape) for t in loss.grad_fn.saved_tensors] == [(N, H), (V, H)]


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_op_makes_a_tensor_of_all_the_logits():
    g = torch.Generator().manual_seed(0)
    n, h, v, chunk = 256, 8, 300, 16
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    with _LargestTensor() as mode:
        linear_cross_entropy(hidden, weight, targets, chunk_size=chunk).backward()
    assert mode.largest <= chunk * v  # one chunk's logits at most
    with _LargestTensor() as full:  # the probe sees the unchunked head's logits
        _reference(hidden, weight, targets).backward()
    assert full.largest == n * v


def test_default_chunk_size_and_errors():
    assert default_chunk_size(32000) == 4194 and default_chunk_size(10**12) == 1
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"targets \[36\]"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden, weight.t(), targets)


def test_next_token_targets_mask_row_ends_and_document_boundaries():
    labels = torch.arange(10)[None]
    cu = torch.tensor([0, 4, 9, 10], dtype=torch.int32)
    assert next_token_targets(labels, cu).tolist() == [[1, 2, 3, -100, 5, 6, 7, 8, -100, -100]]
    assert next_token_targets(labels.view(2, 5)).tolist() == [[1, 2, 3, 4, -100], [6, 7, 8, 9, -100]]


# --------------------------------------------------------------------------------------------- the model
def _model_grads(model, ids, labels, cu=None, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, cu_seqlens=cu, labels=labels, collect_metrics=False, **kwargs)
    (out.loss + out.aux_loss).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_model_without_logits_equals_the_logits_path(tied, packed):
    torch.manual_seed(0)
    model = tiny_model(["gated_deltanet", "dsa", "attention"], tie_word_embeddings=tied)
    model.set_dsa_stage("sparse")  # T = 30 > index_topk: the indexer selects and its KL joins the objective
    model.loss_chunk_size = 7  # does not divide the 30 or 60 positions
    if packed:
        ids, cu = torch.randint(0, 97, (1, 30)), torch.tensor([0, 9, 10, 24, 30], dtype=torch.int32)
    else:
        ids, cu = torch.randint(0, 97, (2, 30)), None
    labels = ids.clone()
    labels[0, 5:8] = -100
    ref, ref_grads = _model_grads(model, ids, labels, cu)
    out, grads = _model_grads(model, ids, labels, cu, return_logits=False)
    assert out.logits is None and ref.logits.shape == (*ids.shape, 97)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert grads.keys() == ref_grads.keys() and ("embed_tokens.weight" if tied else "lm_head.weight") in grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    if tied:  # one parameter: the embedding's gradient and the head's add up in it
        assert model.lm_head.weight is model.embed_tokens.weight and "embed_tokens.weight" in grads


def test_model_without_logits_under_bf16_autocast():
    torch.manual_seed(0)
    model = tiny_model(["gated_deltanet", "attention"], tie_word_embeddings=True)
    ids, cu = torch.randint(0, 97, (1, 40)), torch.tensor([0, 13, 30, 40], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = _model_grads(model, ids, ids, cu)
        model.loss_chunk_size = 9
        out, grads = _model_grads(model, ids, ids, cu, return_logits=False)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-3, atol=1e-3)
    for name in grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=2e-2, atol=2e-2 * scale, msg=name)


def test_return_logits_false_needs_labels():
    model = tiny_model(["attention"])
    with pytest.raises(ValueError, match="needs labels"):
        model(torch.randint(0, 97, (1, 8)), return_logits=False)
