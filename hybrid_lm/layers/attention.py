"""Dense causal multi-head attention with grouped KV heads (GQA, Ainslie et al. 2023) and RoPE.

Options cover the attention variants of the models people compare against: QK-norm (Qwen3), qkv bias (Qwen2),
a per-head sigmoid output gate (Qwen3-Next's gated attention), partial rotary dims (Qwen3-Next), and a sliding
window (Mistral). Shapes: `x [B, T, C]`, heads `[B, T, H, D]` (fla's layout), `HQ` query and `HKV` key/value heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..registry import Mixer, MixerConfig, register_mixer
from .norm import RMSNorm
from .rope import apply_rope
from .sequence import GrowingBuffer, SequenceInfo

ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "flash_attn")


@dataclass
class AttentionConfig(MixerConfig):
    qk_norm: bool = False
    attention_bias: bool = False
    output_gate: bool = False
    sliding_window: int | None = None
    partial_rotary_factor: float = 1.0
    backend: str = "auto"

    def validate(self, model, where):
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"{where}.sliding_window = {self.sliding_window}: must be >= 1 (or null for none)")
        rot = int(model.head_dim * self.partial_rotary_factor)
        if not 0 < self.partial_rotary_factor <= 1 or rot % 2:
            raise ValueError(f"{where}.partial_rotary_factor = {self.partial_rotary_factor}: must be in (0, 1] and "
                             f"give an even number of rotary dims of head_dim = {model.head_dim}")
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{where}.backend = {self.backend!r}: choose one of {list(ATTENTION_BACKENDS)}")


@register_mixer("attention", config=AttentionConfig)
class Attention(Mixer):
    cache_kind = "kv"

    def __init__(self, config, layer_idx: int, mixer_config: AttentionConfig):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.rotary_dim = int(self.head_dim * mixer_config.partial_rotary_factor)
        self.settings = mixer_config
        C, H, HKV, D = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        bias = mixer_config.attention_bias
        # with an output gate, q_proj emits [query | gate] per head, as in Qwen3-Next
        self.q_proj = nn.Linear(C, H * D * (2 if mixer_config.output_gate else 1), bias=bias)
        self.k_proj = nn.Linear(C, HKV * D, bias=bias)
        self.v_proj = nn.Linear(C, HKV * D, bias=bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        if mixer_config.qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)

    def project(self, x: torch.Tensor, seq: SequenceInfo):
        """q `[B, T, HQ, D]`, k/v `[B, T, HKV, D]` with RoPE applied, and the output gate (or None)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, -1)
        gate = None
        if self.settings.output_gate:
            q, gate = q.chunk(2, dim=-1)  # [B, T, H, D] each
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.settings.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = seq.rope(self.rotary_dim, self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, gate

    def finish(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """Gate (if any) and project the heads `[B, T, HQ, D]` back to `[B, T, C]`."""
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o.flatten(2))

    @staticmethod
    def extend_kv(k, v, cache):
        """Append this step's k/v to the layer cache and return the full k/v `[B, L, HKV, D]`."""
        if cache is None:
            return k, v
        if "k" not in cache:
            cache["k"], cache["v"] = GrowingBuffer(), GrowingBuffer()
        return cache["k"].append(k), cache["v"].append(v)

    def forward(self, x, seq, cache=None):
        q, k, v, gate = self.project(x, seq)
        k, v = self.extend_kv(k, v, cache)
        o = ops.attention(q, k, v, causal=True, window=self.settings.sliding_window, cu_seqlens=seq.cu_seqlens,
                          backend=self.settings.backend)
        return self.finish(o, gate)

    def flops_per_token(self, context_len: int) -> float:
        # q.k and p.v for the average causal context (T/2), or the window
        ctx = context_len / 2 if self.settings.sliding_window is None else min(self.settings.sliding_window,
                                                                               context_len / 2)
        return 4.0 * ctx * self.num_heads * self.head_dim
