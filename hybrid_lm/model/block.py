"""The one generic block: `x + mixer(norm(x))`, then `x + mlp(norm(x))` (pre-norm, as in Llama and Qwen3-Next).
The mixer comes from the registry by the layer's type; the block never branches on it. The feed-forward is the dense
SwiGLU, or from `moe.first_k_dense_replace` on a mixture of experts; both take `(x, seq)` so MoE can report its
balancing loss. Shapes: `x [B, T, C]`."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from ..layers import MoE, RMSNorm, SwiGLU, matmul_dtype
from ..registry import get_mixer


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        layer_type = config.layer_types[layer_idx]
        spec = get_mixer(config.mixer_type(layer_type))
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = spec.cls(config, layer_idx, config.mixer_config(layer_type))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config, layer_idx)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, seq, cache=None):
        # the residual stream keeps its dtype (fp32 under autocast); what the mixer and the feed-forward read is cast
        # once to the dtype their projections compute in (under autocast each of the ~6 projections on one fp32
        # input would cast it again in the forward, and add their input gradients in fp32 in the backward)
        x = x + self.mixer(self.input_layernorm(x, matmul_dtype(x)), seq, cache)
        return x + self.mlp(self.post_attention_layernorm(x, matmul_dtype(x)), seq)
