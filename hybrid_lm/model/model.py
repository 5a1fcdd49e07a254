"""The one causal LM class: embedding -> blocks (one per entry of `layer_types`) -> final RMSNorm -> LM head.

Architectures differ only in their config. `cu_seqlens` packs documents into one row (batch 1) so that no token
sees another document; labels follow the Hugging Face convention (shifted inside; -100 ignored), and predictions
across a document boundary are masked. Shapes: `input_ids [B, T]`, `x [B, T, C]`, `logits [B, T, V]`.

Two memory savers for training (both leave the numbers unchanged): `forward(..., labels=..., return_logits=False)`
computes the loss with the chunked LM head + cross-entropy of `loss.py` and never holds the `[B, T, V]` logits
(`logits` is then None); `set_activation_checkpointing(True)` recomputes each block's activations in the backward
instead of keeping them (`torch.utils.checkpoint`, non-reentrant), with the blocks' auxiliary losses, metrics and MoE
loads recorded once, by the original forward only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, validate_config
from ..layers import DSA_STAGES, DeepSeekSparseAttention, MoE, RMSNorm, SequenceInfo
from .block import Block
from .cache import Cache
from .generation import generate
from .loss import linear_cross_entropy, next_token_targets


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # None when the loss was computed chunked (`return_logits=False`)
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)
    hidden_states: tuple | None = None


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        validate_config(config)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing: bool | int = False  # see set_activation_checkpointing
        self.residual_dtype: torch.dtype | None = None  # see set_residual_dtype
        self.loss_chunk_size: int | None = None  # tokens per chunk of the chunked loss; None: ~0.5 GiB fp32 logits
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for projections and embeddings; residual outputs (o_proj, down_proj)
        scaled by 1/sqrt(2 * layers) as in GPT-2; norms to one; mixer-specific init (e.g. GDN's decay) last."""
        if self.embed_tokens.weight.is_meta:
            return
        for name, module in self.named_modules():
            if module is not self:
                self.init_module(name, module)

    def init_module(self, name: str, module: nn.Module) -> None:
        """Initialise one submodule (qualified `name`) as `reset_parameters` does; transformers calls this through
        the exported model for weights a checkpoint lacks."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
            nn.init.normal_(module.weight, 0.0, out_std if leaf in ("o_proj", "down_proj") else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()

    # ----------------------------------------------------------------------------------------------- forward
    def _sequence_info(self, input_ids, cu_seqlens, cache) -> SequenceInfo:
        B, T = input_ids.shape
        offset = cache.seq_len if cache is not None else 0
        vocab, max_pos = self.config.vocab_size, self.config.max_position_embeddings
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab}); "
                             f"check the tokenizer matches this model (vocab_size = {vocab})")
        device = input_ids.device
        if cu_seqlens is None:
            longest = offset + T
            position_ids = torch.arange(offset, offset + T, device=device).expand(B, T)
        else:
            if B != 1 or cache is not None:
                raise ValueError(f"cu_seqlens packs documents into one row: input_ids must be [1, T] (got "
                                 f"{list(input_ids.shape)}) and no cache may be given")
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
            if cu_seqlens[0] != 0 or cu_seqlens[-1] != T or (cu_seqlens[1:] < cu_seqlens[:-1]).any():
                raise ValueError(f"cu_seqlens must rise from 0 to T = {T}; got {cu_seqlens.tolist()[:8]}...")
            lengths = cu_seqlens.diff()
            longest = int(lengths.max())
            starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=T)
            position_ids = (torch.arange(T, device=device) - starts)[None]  # [1, T]
        if longest > max_pos:
            raise ValueError(f"a sequence of {longest} tokens exceeds max_position_embeddings = {max_pos}; "
                             f"shorten the input or raise max_position_embeddings in the model config")
        return SequenceInfo(position_ids=position_ids, cu_seqlens=cu_seqlens, offset=offset)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: Cache | None = None,
                output_hidden_states: bool = False, collect_metrics: bool = True,
                return_logits: bool = True) -> LMOutput:
        """`collect_metrics=False` skips the per-layer diagnostics that cost time (DSA's attention recall is a
        dense O(T^2) pass); auxiliary losses and their cheap metrics (the indexer KL) are always reported.

        `return_logits=False` (needs `labels`) computes the same loss with the chunked LM head + cross-entropy
        (`linear_cross_entropy`, `self.loss_chunk_size` tokens at a time) and returns `logits=None`: what training
        wants, since the `[B, T, V]` logits and their fp32 copies dominate memory at long contexts."""
        if not return_logits and labels is None:
            raise ValueError("return_logits=False computes the loss without logits: it needs labels")
        seq = self._sequence_info(input_ids, cu_seqlens, cache)
        seq.collect_metrics = collect_metrics
        x = self.embed_tokens(input_ids)
        low = self.residual_dtype if torch.is_autocast_enabled(x.device.type) else None
        if low is not None:
            x = x.to(low)
        hidden = [x] if output_hidden_states else None
        recompute = self.checkpointed_blocks() if cache is None and torch.is_grad_enabled() else 0
        for i, layer in enumerate(self.layers):
            if i < recompute:
                x = self._checkpointed(layer, x, seq)
            else:
                x = layer(x, seq, cache.layers[i] if cache is not None else None)
            if low is not None:
                x = x.to(low)  # a no-op for the zoo's blocks (each returns its input's dtype); keeps a wider one out
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        logits = loss = None
        if return_logits:
            logits = self.lm_head(x)
            loss = self.lm_loss(logits, labels, seq.cu_seqlens) if labels is not None else None
        else:
            targets = next_token_targets(labels, seq.cu_seqlens)  # [B, T], the last position of a row ignored
            loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                        chunk_size=self.loss_chunk_size)
        aux = torch.stack(seq.aux_losses).sum() if seq.aux_losses else x.new_zeros((), dtype=torch.float32)
        return LMOutput(logits, loss, aux, seq.metrics, tuple(hidden) if hidden is not None else None)

    @staticmethod
    def lm_loss(logits, labels, cu_seqlens=None, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy over the scored targets (mean, or `reduction="sum"`); no prediction crosses a
        document boundary."""
        targets = next_token_targets(labels, cu_seqlens)[:, :-1]  # [B, T-1]: position t predicts token t+1
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction=reduction)

    # ----------------------------------------------------------------------------------------------- memory
    def set_activation_checkpointing(self, on: bool | int = True) -> None:
        """Activation checkpointing: while gradients are enabled and no cache is given, a checkpointed block keeps
        only its input and recomputes its activations during the backward (`torch.utils.checkpoint`,
        non-reentrant): one more forward of that block for the memory of its activations; gradients are unchanged.
        `True` checkpoints every block, an integer n the first n blocks (memory and recomputation both scale with
        n, so n can be the fewest blocks that fit), `False` or 0 none."""
        n = len(self.layers)
        if not isinstance(on, bool) and (not isinstance(on, int) or not 0 <= on <= n):
            raise ValueError(f"activation_checkpointing = {on!r}: give true (every block), false, or the number of "
                             f"blocks to checkpoint, from 0 to num_hidden_layers = {n} (the first n blocks)")
        self.activation_checkpointing = on

    def set_residual_dtype(self, dtype: torch.dtype | None) -> None:
        """The residual stream's dtype under autocast. None (the default): the embedding's dtype, fp32 with fp32
        parameters, so every block adds its bf16 output to an fp32 stream. `torch.bfloat16`: the stream is cast
        after the embedding and stays bf16 (as with bf16 parameters in Megatron or FSDP mixed precision): half the
        bytes for the adds, norms and their gradients, at the cost of rounding the stream to 8 bits of mantissa at
        every block. Without autocast it has no effect. Norms still compute in fp32."""
        if dtype not in (None, torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"residual dtype {dtype!r}: give None (the embedding's), torch.bfloat16, torch.float16 "
                             "or torch.float32")
        self.residual_dtype = dtype

    def checkpointed_blocks(self) -> int:
        """How many blocks (the first ones) recompute their activations in the backward."""
        on = self.activation_checkpointing
        return len(self.layers) if on is True else int(on)

    @staticmethod
    def _checkpointed(layer: Block, x: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        """`layer(x, seq)` under checkpointing. The first call is the real forward and reports to `seq` (aux
        losses, metrics, MoE loads); the backward's recomputation runs the same computation against a throwaway
        `seq.for_recompute()`, so nothing is reported twice (the aux losses the graph holds are those of the first
        call; the recomputation only restores their saved tensors)."""
        calls = 0

        def run(h):
            nonlocal calls
            calls += 1
            return layer(h, seq.for_checkpointed() if calls == 1 else seq.for_recompute())

        return checkpoint(run, x, use_reentrant=False)

    # ----------------------------------------------------------------------------------------------- DSA
    def _dsa_layers(self):
        return [m for m in self.modules() if isinstance(m, DeepSeekSparseAttention)]

    def set_dsa_stage(self, stage: str) -> None:
        if stage not in DSA_STAGES:
            raise ValueError(f"unknown dsa_stage {stage!r}; choose one of {list(DSA_STAGES)}")
        if stage != "none" and not self._dsa_layers():
            raise ValueError(f"dsa_stage {stage!r} needs DSA layers, but layer_types has none: "
                             f"{sorted(set(self.config.layer_types))}")
        for layer in self._dsa_layers():
            layer.dsa_stage = stage

    def set_indexer_loss_weight(self, weight: float) -> None:
        for layer in self._dsa_layers():
            layer.indexer_loss_weight = float(weight)

    def indexer_parameters(self):
        return (p for n, p in self.named_parameters() if ".indexer." in n)

    # ----------------------------------------------------------------------------------------------- MoE
    def update_moe_balance(self, taken: bool = True) -> None:
        """Call after each optimizer step: moves the expert-selection biases of MoE layers with `balancing: bias`
        (DeepSeek-V3's auxiliary-loss-free balancing) from the loads seen since the last call; no-op otherwise.
        `taken=False` after a skipped step (a non-finite loss): its loads are dropped, so they move no bias."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.update_balance(taken)

    # ----------------------------------------------------------------------------------------------- misc
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.embed_tokens.weight), None)
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, context_len: int) -> float:
        """Forward FLOPs per token: 2 per matmul weight (embedding lookup excluded) plus each mixer's
        context-dependent part at the given context length (averaged over causal positions); MoE layers count only
        the experts a token uses."""
        matmul = self.num_parameters() - self.embed_tokens.weight.numel()
        matmul -= sum(m.inactive_parameters() for m in self.modules() if isinstance(m, MoE))
        if self.config.tie_word_embeddings:
            matmul += self.lm_head.weight.numel()
        return 2.0 * matmul + sum(layer.mixer.flops_per_token(context_len) for layer in self.layers)

    def new_cache(self) -> Cache:
        return Cache(len(self.layers))

    generate = generate
