"""Mixture-of-experts feed-forward: routed SwiGLU experts plus optional shared experts.

DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066): many small routed experts and always-on shared experts, with
sigmoid scores, group-limited routing and auxiliary-loss-free balancing from DeepSeek-V3 (arXiv 2412.19437,
section 2.1.2); Qwen3-Next's sigmoid gate on the shared expert; the Switch Transformer load-balancing loss (Fedus et
al. 2021, arXiv 2101.03961) in DeepSeek-V3's normalisation. Settings: `MoEConfig` in `hybrid_lm/config.py`.

The experts run grouped, never looping over tokens: the N*K (token, expert) pairs are sorted by expert and each
expert multiplies one contiguous slice. Expert weights are stacked tensors in Hugging Face's layout, `gate_up_proj
[E, 2I, C]` (gate rows first) and `down_proj [E, C, I]`. Two implementations of that step (op `moe_experts`, chosen
by `MoEConfig.backend` through `ops.backends`): `grouped_mm`, one `torch.nn.functional.grouped_mm` (or
`torch._grouped_mm`) call per matrix over all experts, used when this torch runs it for the device and dtype (probed
once) and the dims are 16-byte aligned; `reference`, a Python loop over experts (not tokens) with one matmul per
non-empty slice, any dtype.

Shapes: `x [B, T, C]`, N = B*T tokens, E experts, K experts per token, M = N*K routed rows, I expert width.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from ..ops.backends import get_backend, register_backend, resolve_backend
from .mlp import SwiGLU
from .norm import matmul_dtype


def moe_route(logits: torch.Tensor, cfg: MoEConfig, bias: torch.Tensor | None = None):
    """Top-k routing from router logits `[N, E]` (fp32). Returns mixture weights `[N, K]`, expert indices `[N, K]`
    and the scores `[N, E]`. `bias` (aux-loss-free balancing) shifts the selection only, never the weights."""
    scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.to(scores.dtype)
    N, E = choice.shape
    if cfg.n_group > 1:
        # a group's score is the sum of its two best experts (DeepSeek-V3); the best topk_group groups stay open
        grouped = choice.view(N, cfg.n_group, E // cfg.n_group)  # [N, G, E/G]
        group_score = grouped.topk(min(2, E // cfg.n_group), dim=-1).values.sum(-1)  # [N, G]
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(cfg.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
    indices = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [N, K]
    weights = scores.gather(1, indices)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices, scores


def moe_aux_loss(scores: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Load-balancing loss `(E / K) * sum_e f_e * P_e` over a batch: f_e = tokens routed to e / N, P_e = mean
    (sum-normalised) score of e. Equals 1 when routing is uniform; Switch / Hugging Face report K times this."""
    N, E = scores.shape
    f = counts.to(scores.dtype) / N  # [E], sums to K
    P = (scores / scores.sum(-1, keepdim=True)).mean(0)  # [E], sums to 1
    return (E / top_k) * (f * P).sum()


# --------------------------------------------------------------------------------------------- the expert op
def _experts_reference(x, gate_up_proj, down_proj, counts):
    # split / unbind (not indexing) so the backward assembles each gradient once instead of once per expert
    ys = []
    for rows, w1, w2 in zip(x.split(counts.tolist()), gate_up_proj.unbind(0), down_proj.unbind(0)):
        gate, up = F.linear(rows, w1).chunk(2, dim=-1)  # [n, I] each
        ys.append(F.linear(F.silu(gate) * up, w2))  # [n, C]
    return torch.cat(ys)


def _grouped_mm():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _experts_grouped_mm(x, gate_up_proj, down_proj, counts):
    mm = _grouped_mm()
    offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's slice; stays on the device (no sync)
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's lists
        dtype = torch.get_autocast_dtype(x.device.type)
        x, gate_up_proj, down_proj = x.to(dtype), gate_up_proj.to(dtype), down_proj.to(dtype)
    gate, up = mm(x, gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # [M, I] each
    return mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offs)  # [M, C]


@functools.cache
def _grouped_mm_runs(device_type: str, index: int | None, dtype: torch.dtype) -> bool:
    """Whether this torch's grouped_mm runs (forward and backward) on this device and dtype: one tiny probe."""
    if _grouped_mm() is None:
        return False
    device = torch.device(device_type, index)
    try:  # outside no_grad / inference / autocast, which the first call may come from
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            x = torch.ones(2, 16, device=device, dtype=dtype, requires_grad=True)
            w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([1, 2], device=device, dtype=torch.int32)
            y = _grouped_mm()(x, w.transpose(1, 2), offs=offs)
            torch.autograd.grad(y, (x, w), torch.ones_like(y))
        return True
    except Exception:  # an unsupported device or dtype raises; that means "not available"
        return False


def _grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return _grouped_mm_runs(device.type, device.index, dtype)


def _grouped_mm_supports(features: dict) -> str | None:
    align = 16 // features["itemsize"]
    if features["hidden_size"] % align or features["intermediate_size"] % align:
        return f"hidden and expert sizes must be multiples of {align} for 16-byte aligned rows"
    return None


register_backend("moe_experts", "reference", _experts_reference, priority=0)
register_backend("moe_experts", "grouped_mm", _experts_grouped_mm, available=_grouped_mm_available, priority=10,
                 requires="a torch whose grouped_mm runs on this device and dtype",
                 supports=_grouped_mm_supports)


def moe_experts(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, counts: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """SwiGLU experts over rows sorted by expert: rows `[M, C]`, `counts [E]` rows per expert in order, weights
    `gate_up_proj [E, 2I, C]`, `down_proj [E, C, I]`; returns `[M, C]`."""
    dtype = matmul_dtype(x)  # what the matmuls see
    features = {"hidden_size": x.shape[-1], "intermediate_size": down_proj.shape[-1], "itemsize": dtype.itemsize}
    name = resolve_backend("moe_experts", backend, x.device, dtype, features=features)
    return get_backend("moe_experts", name)(x, gate_up_proj, down_proj, counts)


# --------------------------------------------------------------------------------------------- modules
class MoERouter(nn.Module):
    """The router `weight [E, C]` and, with bias balancing, DeepSeek-V3's `e_score_correction_bias [E]`."""

    def __init__(self, hidden_size: int, num_experts: int, with_bias: bool, init_std: float):
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if with_bias:  # not trained by gradients: moved by `MoE.update_balance` after each optimizer step
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.normal_(self.weight, 0.0, self.init_std)
        if hasattr(self, "e_score_correction_bias"):
            nn.init.zeros_(self.e_score_correction_bias)

    def extra_repr(self) -> str:
        return f"experts={self.weight.shape[0]}, hidden={self.weight.shape[1]}, " \
               f"selection_bias={hasattr(self, 'e_score_correction_bias')}"


class MoEExperts(nn.Module):
    """E stacked SwiGLU experts of width I (Hugging Face's `experts.gate_up_proj` / `experts.down_proj`)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, init_std: float, out_std: float):
        super().__init__()
        self.init_std, self.out_std = init_std, out_std
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.gate_up_proj.is_meta:
            return
        nn.init.normal_(self.gate_up_proj, 0.0, self.init_std)
        nn.init.normal_(self.down_proj, 0.0, self.out_std)  # a residual output, scaled like down_proj/o_proj

    def extra_repr(self) -> str:
        E, C, I = self.down_proj.shape
        return f"experts={E}, hidden={C}, intermediate={I}"


class MoE(nn.Module):
    """`routed experts (+ shared expert)`; called as `mlp(x, seq)` and reports its balancing loss and loads to seq."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        cfg: MoEConfig = config.moe
        self.settings, self.layer_idx = cfg, layer_idx
        C, std = config.hidden_size, config.initializer_range
        out_std = std / (2 * config.num_hidden_layers) ** 0.5
        self.gate = MoERouter(C, cfg.num_experts, cfg.balancing == "bias", std)
        self.experts = MoEExperts(cfg.num_experts, C, cfg.moe_intermediate_size, std, out_std)
        if cfg.num_shared_experts:
            self.shared_expert = SwiGLU(C, cfg.shared_expert_intermediate_size)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(C, 1, bias=False)
        self._pending_load = None  # expert loads [E] since the last balance update (bias balancing, training)

    def forward(self, x: torch.Tensor, seq=None) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # [N, C]
        fp = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32 at least
            logits = F.linear(flat.to(fp), self.gate.weight.to(fp))  # [N, E]
        weights, indices, scores = moe_route(logits, self.settings, getattr(self.gate, "e_score_correction_bias",
                                                                             None))
        counts = torch.zeros(self.settings.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, indices.flatten(), torch.ones_like(indices.flatten()))  # [E], no host sync
        y = self._routed(flat, weights, indices, counts)
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(flat)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            y = y + shared
        if self.training and seq is not None:
            self._report(seq, scores, counts)
        return y.view(B, T, C)

    def _routed(self, flat, weights, indices, counts):
        N, K = indices.shape
        order = indices.flatten().argsort(stable=True)  # [M]: (token, slot) pairs grouped by expert
        token = order // K  # [M]
        ys = moe_experts(flat.index_select(0, token), self.experts.gate_up_proj, self.experts.down_proj, counts,
                         backend=self.settings.backend)  # [M, C]
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(flat, dtype=ys.dtype).index_add(0, token, ys).to(flat.dtype)  # [N, C]

    def _report(self, seq, scores, counts):
        cfg = self.settings
        name = f"moe/layer{self.layer_idx}"
        load = counts.float() * cfg.num_experts / counts.sum().clamp_min(1)  # [E], 1.0 = an even share
        seq.metrics[f"{name}/max_load"] = load.max()
        if cfg.balancing == "aux_loss" and cfg.aux_loss_coef > 0:
            aux = moe_aux_loss(scores, counts, cfg.num_experts_per_tok)
            seq.aux_losses.append(cfg.aux_loss_coef * aux)
            seq.metrics[f"{name}/aux_loss"] = aux.detach()
        elif cfg.balancing == "bias" and not seq.recomputing:  # checkpointing's recomputation: counted already
            pending = counts.float() if self._pending_load is None else self._pending_load + counts
            self._pending_load = pending.detach()

    @torch.no_grad()
    def update_balance(self, taken: bool = True) -> None:
        """DeepSeek-V3's aux-loss-free step: raise the selection bias of under-loaded experts and lower that of
        over-loaded ones by `bias_update_rate`, from the loads seen since the last call (summed over ranks). After a
        step that was skipped, not taken (`taken=False`), the loads are dropped and the biases stay."""
        if self._pending_load is None:
            return
        load, self._pending_load = self._pending_load, None
        if not taken or not self.gate.weight.requires_grad:  # a frozen router (DSA's dense warm-up) keeps its routing
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank must apply the same update
        bias = self.gate.e_score_correction_bias
        bias += self.settings.bias_update_rate * torch.sign(load.mean() - load).to(bias.dtype)

    def inactive_parameters(self) -> int:
        """Expert weights a token does not use (its FLOPs count only the K chosen experts)."""
        cfg = self.settings
        per_expert = self.experts.gate_up_proj[0].numel() + self.experts.down_proj[0].numel()
        return (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
