"""Autoregressive decoding with the per-layer cache: one prefill forward over the prompt, then one token per step.
Sampling: greedy, or temperature with optional top-k / top-p (nucleus) filtering. Shapes: `input_ids [B, T]`."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token `[B]` from the last-position logits `[B, V]`."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature}: must be > 0 when sampling (use do_sample=False for greedy)")
    if top_p is not None and top_p < 0:
        raise ValueError(f"top_p = {top_p}: must be in [0, 1] (the probability mass to sample from; None or 1: all)")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue every row of `input_ids [B, T]` by up to `max_new_tokens`; returns `[B, T + new]`.
    Rows that emit `eos_token_id` keep emitting it until all rows are done."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {list(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: must be >= 0")
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings = {limit}")
    was_training = model.training
    model.eval()
    try:  # the caller's mode comes back also when decoding is interrupted (Ctrl-C) or fails
        cache = model.new_cache()
        out = [input_ids]
        logits = model(input_ids, cache=cache).logits[:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            out.append(token[:, None])
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = model(token[:, None], cache=cache).logits[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
