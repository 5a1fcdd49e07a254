"""Dense causal multi-head attention with grouped KV heads (GQA, Ainslie et al. 2023) and RoPE, or with DeepSeek's
multi-head latent attention (MLA, `mla.py`) as its core when `kv_lora_rank` is set.

Options cover the attention variants of the models people compare against: QK-norm (Qwen3), qkv bias (Qwen2),
a per-head sigmoid output gate (Qwen3-Next's gated attention), partial rotary dims (Qwen3-Next), a sliding
window (Mistral), and MLA's low-rank query/key/value latents (DeepSeek-V2/V3/V3.2). Shapes: `x [B, T, C]`, heads
`[B, T, H, D]` (fla's layout), `HQ` query and `HKV` key/value heads, `DK`/`DV` query-key and value head dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..registry import Mixer, MixerConfig, register_mixer
from .mla import AttentionInputs, MLAMixin, validate_mla
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
    # multi-head latent attention (DeepSeek's names); kv_lora_rank null = plain GQA over num_key_value_heads.
    # With MLA the model's head_dim / num_key_value_heads do not apply: keys are qk_nope + qk_rope dims, values
    # v_head_dim, one expanded key/value per query head.
    q_lora_rank: int | None = None  # null: a full-rank q_proj
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = False  # DeepSeek checkpoints rotate interleaved pairs

    def validate(self, model, where):
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"{where}.sliding_window = {self.sliding_window}: must be >= 1 (or null for none)")
        validate_mla(self, where)
        rot = int(model.head_dim * self.partial_rotary_factor)
        if self.kv_lora_rank is None and (not 0 < self.partial_rotary_factor <= 1 or rot % 2):
            raise ValueError(f"{where}.partial_rotary_factor = {self.partial_rotary_factor}: must be in (0, 1] and "
                             f"give an even number of rotary dims of head_dim = {model.head_dim}")
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{where}.backend = {self.backend!r}: choose one of {list(ATTENTION_BACKENDS)}")


@register_mixer("attention", config=AttentionConfig)
class Attention(MLAMixin, Mixer):
    cache_kind = "kv"

    def __init__(self, config, layer_idx: int, mixer_config: AttentionConfig):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.rope_theta = config.rope_theta
        self.settings = mixer_config
        self.mla = mixer_config.kv_lora_rank is not None
        if self.mla:
            self._init_mla(config, mixer_config)
            self.num_kv_heads = self.num_heads  # the latent expands into one key/value per query head
        else:
            self._init_gqa(config, mixer_config)
        self.scale = self.qk_head_dim ** -0.5

    def _init_gqa(self, config, mixer_config: AttentionConfig) -> None:
        self.head_dim = self.qk_head_dim = self.v_head_dim = config.head_dim
        self.rotary_dim = int(self.head_dim * mixer_config.partial_rotary_factor)
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

    def qkv(self, x: torch.Tensor, seq: SequenceInfo, cache: dict | None = None,
            absorb: bool = False) -> AttentionInputs:
        """Queries for this step's tokens and keys/values of every token so far (appended to `cache` if given);
        `absorb`: MLA's latent form (one shared key/value head), ignored without MLA."""
        if self.mla:
            return self._mla_inputs(x, seq, cache, absorb)
        q, k, v, gate = self.project(x, seq)
        k, v = self.extend_kv(k, v, cache)
        return AttentionInputs(q, k, v, gate)

    def project(self, x: torch.Tensor, seq: SequenceInfo):
        """GQA: q `[B, T, HQ, D]`, k/v `[B, T, HKV, D]` with RoPE applied, and the output gate (or None)."""
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

    def finish(self, o: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """Up-project (absorbed MLA), gate (if any) and project the heads `[B, T, HQ, DV]` back to `[B, T, C]`."""
        if inputs.absorbed:
            o = self._mla_values(o)
        if inputs.gate is not None:
            o = o * torch.sigmoid(inputs.gate)
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
        a = self.qkv(x, seq, cache)
        o = ops.attention(a.q, a.k, a.v, causal=True, scale=self.scale, window=self.settings.sliding_window,
                          cu_seqlens=seq.cu_seqlens, backend=self.settings.backend)
        return self.finish(o, a)

    def flops_per_token(self, context_len: int) -> float:
        # q.k and p.v for the average causal context (T/2), or the window
        ctx = context_len / 2 if self.settings.sliding_window is None else min(self.settings.sliding_window,
                                                                               context_len / 2)
        return 2.0 * ctx * self.num_heads * (self.qk_head_dim + self.v_head_dim)
