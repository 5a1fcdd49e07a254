"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, arXiv 2412.06464) as used by fla and Qwen3-Next.

A linear-time recurrent mixer: per head a fast-weight state `S [K, V]` decays by `exp(g_t)` and is corrected by the
delta rule with strength `beta_t`. Projections follow fla's `GatedDeltaNet` (parameter names included): q/k/v
projections, short causal depthwise convolutions + SiLU, L2-normalised q/k, `beta = sigmoid(b_proj x)`,
`g = -exp(A_log) * softplus(a_proj x + dt_bias)`, a gated RMSNorm with `g_proj`, then `o_proj`.
Grouped value heads (more value heads than key heads, as in Qwen3-Next) share each q/k head.

Shapes: `x [B, T, C]`, q/k `[B, T, H, K]`, v `[B, T, HV, V]`, state `[B, HV, K, V]`, conv state `[B, C, W-1]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..registry import Mixer, MixerConfig, register_mixer
from .norm import GatedRMSNorm
from .sequence import SequenceInfo

GDN_BACKENDS = ("auto", "reference", "recurrent", "fla")


def state_flops_per_token(heads: int, k: int, v: int, chunk: int = 64) -> float:
    """Forward FLOPs per token of a chunked linear-attention state of `heads` x [k, v]: decay/update/readout
    (~6 k v per head) plus the intra-chunk terms (2 * chunk * (k + v))."""
    return heads * (6.0 * k * v + 2.0 * chunk * (k + v))


@dataclass
class GatedDeltaNetConfig(MixerConfig):
    num_heads: int | None = None  # default: the model's num_attention_heads
    num_v_heads: int | None = None  # default: num_heads
    head_k_dim: int | None = None  # default: the model's head_dim
    head_v_dim: int | None = None  # default: head_k_dim
    conv_size: int = 4
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-5
    backend: str = "auto"

    def resolved(self, model) -> tuple[int, int, int, int]:
        h = self.num_heads or model.num_attention_heads
        k = self.head_k_dim or model.head_dim
        return h, self.num_v_heads or h, k, self.head_v_dim or k

    def validate(self, model, where):
        for key in ("num_heads", "num_v_heads", "head_k_dim", "head_v_dim"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{where}.{key} = {value!r}: must be a positive integer (or left out for the "
                                 f"model's default)")
        h, hv, k, v = self.resolved(model)
        if hv % h:
            raise ValueError(f"{where}.num_v_heads = {hv}: must be a multiple of num_heads = {h}")
        if self.conv_size < 1:
            raise ValueError(f"{where}.conv_size = {self.conv_size}: must be >= 1")
        if self.backend not in GDN_BACKENDS:
            raise ValueError(f"{where}.backend = {self.backend!r}: choose one of {list(GDN_BACKENDS)}")


def _depthwise_conv(channels: int, width: int) -> nn.Conv1d:
    # an nn.Conv1d only to hold the weight `[C, 1, W]` under fla's name; the op does the (causal, varlen) math
    return nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1, bias=False)


@register_mixer("gated_deltanet", config=GatedDeltaNetConfig)
class GatedDeltaNet(Mixer):
    cache_kind = "recurrent"

    def __init__(self, config, layer_idx: int, mixer_config: GatedDeltaNetConfig):
        super().__init__()
        self.layer_idx = layer_idx
        self.settings = mixer_config
        C = config.hidden_size
        H, HV, K, V = mixer_config.resolved(config)
        self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim = H, HV, K, V
        self.q_proj = nn.Linear(C, H * K, bias=False)
        self.k_proj = nn.Linear(C, H * K, bias=False)
        self.v_proj = nn.Linear(C, HV * V, bias=False)
        self.a_proj = nn.Linear(C, HV, bias=False)
        self.b_proj = nn.Linear(C, HV, bias=False)
        self.A_log = nn.Parameter(torch.empty(HV))
        self.dt_bias = nn.Parameter(torch.empty(HV))
        self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True
        self.q_conv1d = _depthwise_conv(H * K, mixer_config.conv_size)
        self.k_conv1d = _depthwise_conv(H * K, mixer_config.conv_size)
        self.v_conv1d = _depthwise_conv(HV * V, mixer_config.conv_size)
        self.g_proj = nn.Linear(C, HV * V, bias=False)
        self.o_norm = GatedRMSNorm(V, mixer_config.norm_eps)
        self.o_proj = nn.Linear(HV * V, C, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # fla / Mamba2 init: A ~ U(0, 16), dt ~ logU(1e-3, 0.1) stored as softplus^-1(dt)
        with torch.no_grad():
            if self.A_log.is_meta:
                return
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).clamp_min(1e-4).log())
            dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _conv(self, name: str, x: torch.Tensor, seq: SequenceInfo, cache: dict | None) -> torch.Tensor:
        conv = getattr(self, name)
        state = cache.get(name) if cache is not None else None
        y, final = ops.causal_conv1d(x, conv.weight.squeeze(1), None, activation="silu", cu_seqlens=seq.cu_seqlens,
                                     initial_state=state, output_final_state=cache is not None)
        if cache is not None:
            cache[name] = final
        return y

    def forward(self, x, seq, cache=None):
        B, T, _ = x.shape
        H, HV, K, V = self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        q = self._conv("q_conv1d", self.q_proj(x), seq, cache).view(B, T, H, K)
        k = self._conv("k_conv1d", self.k_proj(x), seq, cache).view(B, T, H, K)
        v = self._conv("v_conv1d", self.v_proj(x), seq, cache).view(B, T, HV, V)
        if HV > H:  # grouped value heads: each q/k head serves HV / H consecutive value heads
            q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)  # [B, T, HV, K]
        fp = torch.promote_types(x.dtype, torch.float32)  # gates in fp32 at least (fp64 stays fp64 in tests)
        beta = torch.sigmoid(self.b_proj(x).to(fp))
        if self.settings.allow_neg_eigval:
            beta = beta * 2.0
        g = -self.A_log.to(fp).exp() * F.softplus(self.a_proj(x).to(fp) + self.dt_bias.to(fp))  # [B, T, HV]
        state = cache.get("state") if cache is not None else None
        o, final = ops.gated_delta_rule(q, k, v, g, beta.to(q.dtype), initial_state=state,
                                        output_final_state=cache is not None, cu_seqlens=seq.cu_seqlens,
                                        use_qk_l2norm=True, backend=self.settings.backend)
        if cache is not None:
            cache["state"] = final
        o = self.o_norm(o, self.g_proj(x).view(B, T, HV, V))  # [B, T, HV, V]
        return self.o_proj(o.flatten(2))

    def flops_per_token(self, context_len: int) -> float:
        return state_flops_per_token(self.num_v_heads, self.head_k_dim, self.head_v_dim)
