"""The LM loss without the `[N, V]` logits: a chunked LM head + cross-entropy ("fused linear cross-entropy").

`F.cross_entropy(h @ W^T)` keeps the logits, their fp32 copy, the saved log-softmax and their gradients alive at
once: at N = 32,768 tokens and V = 32,000 that is over 12 GiB. `linear_cross_entropy` runs the head a chunk of
tokens at a time and, when gradients are wanted, computes them in the same pass: per chunk
`p = softmax(h_c W^T) - onehot(target)` divided by the number of scored targets gives `grad_h_c = p W` and adds
`p^T h_c` to the weight's gradient (accumulated in fp32). Backward only scales those by the incoming gradient, so
nothing of size N x V outlives a chunk; what is kept is `grad_hidden [N, H]` and `grad_weight [V, H]`.

Precision follows the unchunked head: under autocast both operands are cast to the autocast dtype as `nn.Linear`
would (bf16 logits), then the log-softmax runs in fp32 (in fp64 for fp64 models). Targets equal to `ignore_index`
are not scored; with none scored the mean is 0/0 = nan and the gradients are zero, as with `F.cross_entropy`.
Pure PyTorch: runs on CPU and GPU alike. Shapes: `hidden [N, H]`, `weight [V, H]`, `targets [N]`.
"""

from __future__ import annotations

import torch

from ..layers.norm import matmul_dtype

__all__ = ["linear_cross_entropy", "default_chunk_size", "next_token_targets", "LinearCrossEntropy"]

CHUNK_BYTES = 2**29  # fp32 logits of one chunk: ~0.5 GiB (4,194 tokens at V = 32,000)


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about `CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                       ignore_index: int = -100) -> torch.Tensor:
    """`[B, T]` targets of every position: `labels[:, t + 1]`, `ignore_index` at the last position of each row and
    at the last token of every packed document but the last (the next document's first token has no context)."""
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        targets[0, cu_seqlens[1:-1].long() - 1] = ignore_index
    return targets


class LinearCrossEntropy(torch.autograd.Function):
    """`mean_i CE(hidden_i @ weight^T, targets_i)` over non-ignored i; see the module docstring. Not twice
    differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int, dtype: torch.dtype,
                need_hidden_grad: bool, need_weight_grad: bool):
        N = hidden.shape[0]
        acc = torch.promote_types(dtype, torch.float32)  # the log-softmax's dtype
        valid = targets != ignore_index  # [N]
        count = valid.sum()
        scale = 1.0 / count.clamp_min(1).to(acc)  # gradients of a mean over the scored targets (0 if none)
        safe = torch.where(valid, targets, 0)
        w = weight.to(dtype)  # [V, H]
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_weight_grad else None
        for start in range(0, N, chunk_size):
            end = min(start + chunk_size, N)
            h = hidden[start:end].to(dtype)  # [n, H]
            t, ok = safe[start:end], valid[start:end]
            z = (h @ w.t()).to(acc)  # [n, V]: the logits as the unchunked head gives them, then upcast
            lse = torch.logsumexp(z, dim=-1)  # [n]
            target_logit = z.gather(1, t[:, None]).squeeze(1)
            loss_sum += ((lse - target_logit) * ok).sum()
            if not (need_hidden_grad or need_weight_grad):
                continue
            p = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            p[torch.arange(end - start, device=p.device), t] -= 1.0
            p.mul_((ok.to(acc) * scale)[:, None])  # ignored rows get no gradient
            g = p.to(dtype)  # [n, V]: the logits' gradient in the logits' dtype, as the unchunked head has it
            del z, p
            if need_hidden_grad:
                grad_hidden[start:end] = g @ w
            if need_weight_grad:
                grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum / count.to(acc)  # 0/0 = nan when nothing is scored, as F.cross_entropy's mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = gw = None
        if ctx.needs_input_grad[0] and grad_hidden is not None:
            gh = grad_hidden * grad_output.to(grad_hidden.dtype)
        if ctx.needs_input_grad[1] and grad_weight is not None:
            gw = (grad_weight * grad_output.float()).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden [N, H] @ weight[V, H]^T` against `targets [N]`, `chunk_size` tokens at a time
    (default: `default_chunk_size(V)`, ~0.5 GiB of fp32 logits per chunk). Equals
    `F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index)` in value and gradients,
    including under autocast, without keeping `[N, V]` logits or their gradient."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: need hidden [N, H] and weight [V, H]; got {list(hidden.shape)} and "
                         f"{list(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets {list(targets.shape)} must be [N = {hidden.shape[0]}]")
    chunk_size = default_chunk_size(weight.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size = {chunk_size} must be >= 1")
    grad = torch.is_grad_enabled()
    dtype = matmul_dtype(hidden, weight)  # what nn.Linear would multiply in
    with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit, as nn.Linear's autocast does
        return LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_size, dtype,
                                        grad and hidden.requires_grad, grad and weight.requires_grad)
