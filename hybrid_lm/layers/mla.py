"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434, section 2.1), the low-rank core that `attention`
and `dsa` layers use when their settings give `kv_lora_rank`.

Keys and values come from one small joint latent per token, `c = RMSNorm(W_a x)` of `kv_lora_rank` dims, expanded
per head by `kv_b_proj` into a content key (`qk_nope_head_dim`) and a value (`v_head_dim`). Position enters through
a separate decoupled RoPE key of `qk_rope_head_dim` dims, shared by all heads. Queries may go through a low-rank
latent as well (`q_lora_rank`); with DSA that normalised query latent also feeds the lightning indexer, as in
DeepSeek-V3.2. DeepSeek rotates its RoPE dims as interleaved pairs (`rope_interleave: true`, as its checkpoints
expect); the indexer always uses the rotate-half layout.

Training and prefill expand the latent into per-head keys `[nope | rope]` and values for the ordinary attention ops
(DSA's sparse attention excepted: it always takes the latent form below).
Decoding caches only the latent and the rotated RoPE key (`kv_lora_rank + qk_rope_head_dim` numbers per token) and
attends in the latent space: `kv_b_proj`'s key half is absorbed into the query and its value half applied after the
attention, so the op sees one shared key/value head (MQA) and cached tokens are never expanded.

Shapes: `x [B, T, C]`; heads `[B, T, H, D]`; latent `[B, L, R]` with R = kv_lora_rank, L tokens incl. the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .norm import RMSNorm
from .rope import apply_rope
from .sequence import GrowingBuffer, SequenceInfo

MLA_NORM_EPS = 1e-6  # DeepSeek's latent norms use a fixed eps, not the model's rms_norm_eps
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave")


@dataclass
class AttentionInputs:
    """What the attention op consumes: q `[B, T, HQ, DK]`, k `[B, L, HKV, DK]`, v `[B, L, HKV, DV]` over all L keys
    so far (cached ones included), plus what the output side and the DSA indexer need."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gate: torch.Tensor | None = None  # the per-head output gate (GQA's output_gate)
    q_latent: torch.Tensor | None = None  # MLA's normalised query latent `[B, T, q_lora_rank]`, the index query input
    absorbed: bool = False  # k/v are MLA's latent (one shared head): values are up-projected after the attention


def validate_mla(settings, where: str) -> None:
    """Check the MLA fields of an AttentionConfig (`kv_lora_rank` null = plain GQA and no MLA field may be set)."""
    def bad(key, why):
        raise ValueError(f"{where}.{key} = {getattr(settings, key)!r}: {why}")

    if settings.kv_lora_rank is None:
        for key in MLA_FIELDS:
            if getattr(settings, key) not in (None, False):
                bad(key, "an MLA setting, but kv_lora_rank is null (plain GQA); set kv_lora_rank (and "
                         "qk_nope_head_dim, qk_rope_head_dim, v_head_dim) for multi-head latent attention")
        return
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        value = getattr(settings, key)
        if not isinstance(value, int) or value < 1:
            bad(key, "multi-head latent attention (kv_lora_rank set) needs a positive integer here")
    if settings.q_lora_rank is not None and settings.q_lora_rank < 1:
        bad("q_lora_rank", "must be a positive integer, or null for a full-rank q_proj")
    if settings.qk_rope_head_dim % 2:
        bad("qk_rope_head_dim", "RoPE rotates pairs of dims: must be even")
    if settings.qk_norm:
        bad("qk_norm", "MLA normalises its latents instead (q_a_layernorm, kv_a_layernorm); set it false")
    if settings.output_gate:
        bad("output_gate", "not supported with MLA; set it false")
    if settings.partial_rotary_factor != 1.0:
        bad("partial_rotary_factor", "MLA's rotary dims are qk_rope_head_dim; leave it at 1.0")


class MLAMixin:
    """The MLA projections and latent cache, mixed into `Attention` (parameter names as DeepSeek's checkpoints)."""

    def _init_mla(self, config, settings) -> None:
        C, H = config.hidden_size, config.num_attention_heads
        R, R_q = settings.kv_lora_rank, settings.q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = settings.qk_nope_head_dim, settings.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = settings.v_head_dim, R
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.rotary_dim = self.qk_rope_head_dim
        bias = settings.attention_bias
        if R_q is None:
            self.q_proj = nn.Linear(C, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(C, R_q, bias=bias)
            self.q_a_layernorm = RMSNorm(R_q, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(R_q, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, R + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(R, MLA_NORM_EPS)
        self.kv_b_proj = nn.Linear(R, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, C, bias=False)

    def _mla_rope(self, x: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        """RoPE on `x [B, T, H, R]` (all dims rotary). DeepSeek's interleaved pairs (x0, x1), (x2, x3), ... are
        regrouped into halves first: then rotate-half applies, and q.k is unchanged because q and k move alike."""
        if self.settings.rope_interleave:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        cos, sin = seq.rope(self.qk_rope_head_dim, self.rope_theta)
        return apply_rope(x, cos, sin)

    def _mla_inputs(self, x: torch.Tensor, seq: SequenceInfo, cache: dict | None,
                    absorb: bool = False) -> AttentionInputs:
        """`absorb` asks for the latent (MQA) form even without a cache: what index-sparse attention wants, since
        one shared key/value row then serves every head (DeepSeek-V3.2's DSA)."""
        B, T, _ = x.shape
        H, nope, rope, R = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        q_latent = None
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))  # [B, T, R_q]
            q = self.q_b_proj(q_latent)
        q_nope, q_rope = q.view(B, T, H, self.qk_head_dim).split([nope, rope], dim=-1)
        q_rope = self._mla_rope(q_rope, seq)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([R, rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, R]
        k_rope = self._mla_rope(k_rope[:, :, None], seq)[:, :, 0]  # [B, T, rope]
        absorbed = absorb
        if cache is not None:
            # with tokens already cached this is decoding: attend in latent space rather than expand the cache
            if "latent" in cache:
                absorbed = True
            else:
                cache["latent"], cache["k_rope"] = GrowingBuffer(), GrowingBuffer()
            latent, k_rope = cache["latent"].append(latent), cache["k_rope"].append(k_rope)  # [B, L, R], [B, L, rope]
        if absorbed:
            return self._mla_absorbed(q_nope, q_rope, latent, k_rope, q_latent)
        L = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, L, H, nope + self.v_head_dim)
        k_nope, v = kv.split([nope, self.v_head_dim], dim=-1)  # [B, L, H, nope], [B, L, H, DV]
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, L, H, rope)], dim=-1)  # [B, L, H, nope + rope]
        return AttentionInputs(torch.cat([q_nope, q_rope], dim=-1), k, v, q_latent=q_latent)

    def _mla_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into its key part `[H, nope, R]` and value part `[H, DV, R]`."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def _mla_absorbed(self, q_nope, q_rope, latent, k_rope, q_latent) -> AttentionInputs:
        """Queries `[B, T, H, R + rope]` against the one latent key head `[B, L, 1, R + rope]`; the values are the
        latent itself `[B, L, 1, R]` (a view of the keys). q_nope . (W_k c) = (W_k^T q_nope) . c, so the scores
        equal the expanded ones."""
        w_k, _ = self._mla_up_weights()
        q_abs = torch.einsum("bthn,hnr->bthr", q_nope, w_k)  # [B, T, H, R]
        q = torch.cat([q_abs, q_rope], dim=-1)
        k = torch.cat([latent, k_rope], dim=-1)[:, :, None]  # [B, L, 1, R + rope]
        # the values as a view of the keys' latent dims: the sparse kernel then gathers each row once
        return AttentionInputs(q, k, k[..., : latent.shape[-1]], q_latent=q_latent, absorbed=True)

    def _mla_values(self, o: torch.Tensor) -> torch.Tensor:
        """Latent attention output `[B, T, H, R]` -> per-head values `[B, T, H, DV]` (the absorbed value half)."""
        _, w_v = self._mla_up_weights()
        return torch.einsum("bthr,hvr->bthv", o, w_v)
