"""DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv 2512.02556): the lightning indexer picks `index_topk` keys per
query token and the (GQA/MQA or MLA) attention attends only to them, one index set shared by every head. On an MLA
core (`kv_lora_rank` set) the index query comes from MLA's query latent, as in V3.2, and decoding caches the latent.

Training stages (set by `HybridLM.set_dsa_stage`):
- "none": inference behaviour. While every query sees at most `index_topk` keys, DSA equals dense attention and
  runs it directly (the indexer would be wasted work); beyond that, top-k selection + sparse attention.
- "dense_warmup": attention stays dense; the indexer learns `KL(p || softmax(I))` against the head-summed dense
  attention distribution over all causal keys (blockwise, never a [T, T] tensor).
- "sparse": top-k selection on; the indexer learns the KL restricted to the selected keys from detached inputs, so
  the indexer learns only from the KL and the model only from the LM loss.

Shapes: `x [B, T, C]`, heads `[B, T, H, D]`, `indices [B, T, K]`; `a` is the attention's `AttentionInputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..registry import register_mixer
from .attention import Attention, AttentionConfig
from .indexer import LightningIndexer

DSA_STAGES = ("none", "dense_warmup", "sparse")


@dataclass
class DSAConfig(AttentionConfig):
    index_n_heads: int = 4
    index_head_dim: int = 64
    index_topk: int = 2048
    index_rope_dim: int | None = None
    indexer_backend: str = "auto"
    sparse_backend: str = "auto"

    def validate(self, model, where):
        super().validate(model, where)
        if self.index_topk < 1:
            raise ValueError(f"{where}.index_topk = {self.index_topk}: must be >= 1")
        if self.index_n_heads < 1 or self.index_head_dim < 2 or self.index_head_dim % 2:
            raise ValueError(f"{where}: index_n_heads = {self.index_n_heads}, index_head_dim = "
                             f"{self.index_head_dim}: need >= 1 head and an even head dim")
        rope = self.rope_dim
        if rope % 2 or not 0 < rope <= self.index_head_dim:
            raise ValueError(f"{where}.index_rope_dim = {self.index_rope_dim}: must be even and in "
                             f"(0, index_head_dim = {self.index_head_dim}]")
        if self.sliding_window is not None:
            raise ValueError(f"{where}.sliding_window = {self.sliding_window}: DSA selects its own keys; "
                             f"use an `attention` layer for a sliding window")

    @property
    def rope_dim(self) -> int:
        return self.index_rope_dim if self.index_rope_dim is not None else self.index_head_dim // 2


@register_mixer("dsa", config=DSAConfig)
class DeepSeekSparseAttention(Attention):
    cache_kind = "kv+index"

    def __init__(self, config, layer_idx: int, mixer_config: DSAConfig):
        super().__init__(config, layer_idx, mixer_config)
        self.topk = mixer_config.index_topk
        q_input = mixer_config.q_lora_rank if self.mla else None  # V3.2 indexes from the query latent
        self.indexer = LightningIndexer(config.hidden_size, mixer_config.index_n_heads, mixer_config.index_head_dim,
                                        mixer_config.rope_dim, config.rope_theta, q_input_size=q_input,
                                        backend=mixer_config.indexer_backend)
        self.dsa_stage = "none"
        self.indexer_loss_weight = 1.0

    def forward(self, x, seq, cache=None):
        keys = seq.offset + x.shape[1]  # keys visible to the last query (cached ones included)
        sparse = self.dsa_stage == "sparse" or (self.dsa_stage == "none" and keys > self.topk)
        # on MLA the sparse path attends in latent space (V3.2's MQA mode): one gathered row serves every head
        a = self.qkv(x, seq, cache, absorb=sparse)
        if self.dsa_stage == "dense_warmup":
            o = self._dense(a, seq)
            if cache is None:  # the indexer's KL is a training loss; decoding steps have no full rows to match
                self._warmup_loss(x, a, seq)
        elif sparse:
            return self.finish(self._sparse(x, a, seq, cache), a)
        else:
            o = self._dense(a, seq)
        if cache is not None:  # keep the index-key cache in step for later sparse decoding
            self.indexer(x, seq, cache, q_input=a.q_latent)
        return self.finish(o, a)

    def _dense(self, a, seq):
        return ops.attention(a.q, a.k, a.v, causal=True, scale=self.scale, cu_seqlens=seq.cu_seqlens,
                             backend=self.settings.backend)

    def _index(self, x, a, seq, cache=None, detach=False):
        """The indexer's queries, keys and weights; `detach` cuts its inputs off the main graph."""
        q_latent = a.q_latent
        if detach:
            x, q_latent = x.detach(), q_latent.detach() if q_latent is not None else None
        return self.indexer(x, seq, cache, q_input=q_latent)

    def _sparse(self, x, a, seq, cache):
        # in the sparse stage the indexer sees detached inputs: it learns from its KL only
        training_indexer = self.dsa_stage == "sparse" and torch.is_grad_enabled()
        q_idx, k_idx, w = self._index(x, a, seq, cache, detach=training_indexer)
        indices = self.indexer.select(q_idx, k_idx, w, self.topk, seq)
        o, lse = ops.sparse_attention(a.q, a.k, a.v, indices, scale=self.scale, cu_seqlens=seq.cu_seqlens,
                                      return_lse=True, backend=self.settings.sparse_backend)
        if self.dsa_stage == "sparse" and cache is None:
            kl = ops.indexer_kl_sparse(a.q.detach(), a.k.detach(), q_idx, k_idx, w, indices, scale=self.scale,
                                       cu_seqlens=seq.cu_seqlens, attn_lse=lse.detach(),
                                       forward_recomputed=seq.checkpointed)
            self._report(seq, kl, self.indexer_loss_weight, a.q, a.k, indices)
        return o

    def _warmup_loss(self, x, a, seq):
        q_idx, k_idx, w = self._index(x, a, seq, detach=True)
        kl = ops.indexer_kl_dense(a.q.detach(), a.k.detach(), q_idx, k_idx, w, scale=self.scale,
                                  cu_seqlens=seq.cu_seqlens)
        # the warm-up attends densely: its top-k only measures recall, on the steps that log it
        indices = self.indexer.select(q_idx, k_idx, w, self.topk, seq) if seq.collect_metrics else None
        self._report(seq, kl, 1.0, a.q, a.k, indices)

    def _report(self, seq, kl, weight, q, k, indices):
        seq.aux_losses.append(weight * kl)
        name = f"dsa/layer{self.layer_idx}"
        seq.metrics[f"{name}/kl"] = kl.detach()
        if not seq.collect_metrics:
            return
        with torch.no_grad():
            seq.metrics[f"{name}/recall"] = ops.attention_recall(q, k, indices, scale=self.scale,
                                                                 cu_seqlens=seq.cu_seqlens)

    def flops_per_token(self, context_len: int) -> float:
        ctx = min(self.topk, context_len / 2)
        attention = 2.0 * ctx * self.num_heads * (self.qk_head_dim + self.v_head_dim)
        return attention + self.indexer.flops_per_token(context_len)
