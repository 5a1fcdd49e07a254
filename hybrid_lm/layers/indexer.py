"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv 2512.02556, section 2).

For query token t and visible key s: `I[t, s] = sum_j w[t, j] * relu(q_idx[t, j] . k_idx[s])`, with a few index
heads j, one shared index key per token (`k_idx = LayerNorm(W_k h)`), RoPE on the first half of the index dims in
the rotate-half layout, and the head weights `w = W_w h * HI^-0.5 * DI^-0.5` kept in fp32 (the DI^-0.5 dot-product
scale is folded into them). Every DSA layer, the training losses and the decoding cache use this one module.

Shapes: `x [B, T, C]`, `q_idx [B, T, HI, DI]`, `k_idx [B, T, DI]`, `weights [B, T, HI]` (fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .rope import apply_rope
from .sequence import GrowingBuffer, SequenceInfo


class LightningIndexer(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, head_dim: int, rope_dim: int, rope_theta: float,
                 q_input_size: int | None = None, backend: str = "auto"):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.rope_theta = n_heads, head_dim, rope_dim, rope_theta
        self.backend = backend
        # V3.2 takes the index query from the MLA query latent (its checkpoints call this `wq_b`; the DeepSeek-V3.2
        # converter renames it); without a query latent it comes from the hidden state
        self.wq = nn.Linear(q_input_size or hidden_size, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)

    def forward(self, x: torch.Tensor, seq: SequenceInfo, cache: dict | None = None,
                q_input: torch.Tensor | None = None):
        """Index queries, all index keys so far (cached ones included) and fp32 head weights."""
        B, T, _ = x.shape
        cos, sin = seq.rope(self.rope_dim, self.rope_theta)
        q = self.wq(x if q_input is None else q_input).view(B, T, self.n_heads, self.head_dim)
        q = apply_rope(q, cos, sin)  # [B, T, HI, DI]
        k = F.layer_norm(self.wk(x).float(), (self.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float(),
                         self.k_norm.eps).to(x.dtype)
        k = apply_rope(k[:, :, None], cos, sin)[:, :, 0]  # [B, T, DI]
        with torch.autocast(x.device.type, enabled=False):  # DeepSeek keeps the head weights in fp32
            w = F.linear(x.float(), self.weights_proj.weight.float())
        w = w * (self.n_heads ** -0.5 * self.head_dim ** -0.5)  # [B, T, HI]
        if cache is not None:
            if "k_idx" not in cache:
                cache["k_idx"] = GrowingBuffer()
            k = cache["k_idx"].append(k)
        return q, k, w

    def select(self, q_idx, k_idx, weights, topk: int, seq: SequenceInfo) -> torch.Tensor:
        """Top-k visible keys per query `[B, T, topk]` (-1 padded); selection carries no gradient."""
        with torch.no_grad():
            return ops.lightning_indexer_topk(q_idx, k_idx, weights, topk, cu_seqlens=seq.cu_seqlens,
                                              backend=self.backend)

    def flops_per_token(self, context_len: int) -> float:
        return 2.0 * (context_len / 2) * self.n_heads * self.head_dim
