"""Stateless ops (pure functions, no parameters) in fla's [B, T, H, D] layout.

Each op takes ``backend="auto"`` and has a pure-PyTorch reference; optional fast paths (fla,
flash-attn, triton) are detected and chosen in ``backends``.
"""

from . import dsa_loss as _dsa_loss
from .attention import attention
from .backends import has_fla, has_flash_attn, has_triton, list_backends, register_backend, resolve_backend
from .conv import causal_conv1d
from .dsa_loss import *  # noqa: F401,F403
from .gated_delta_rule import gated_delta_rule
from .indexer import lightning_indexer_scores, lightning_indexer_topk
from .norm import rms_norm
from .rotary import rotary
from .sparse_attention import sparse_attention
from . import triton as _triton  # noqa: F401  (registers the Triton DSA kernels as backends)

__all__ = [
    "attention",
    "causal_conv1d",
    "gated_delta_rule",
    "lightning_indexer_scores",
    "lightning_indexer_topk",
    "rms_norm",
    "rotary",
    "sparse_attention",
    "has_fla",
    "has_flash_attn",
    "has_triton",
    "list_backends",
    "register_backend",
    "resolve_backend",
] + list(_dsa_loss.__all__)
