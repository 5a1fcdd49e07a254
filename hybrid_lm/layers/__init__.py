"""nn.Modules: one mixer a file. Importing this package registers the built-in mixers:
`attention` (attention.py), `dsa` (dsa.py), `gated_deltanet` (gated_deltanet.py). Feed-forwards: `SwiGLU` (mlp.py)
and the mixture of experts `MoE` (moe.py)."""

from .attention import Attention, AttentionConfig
from .dsa import DSA_STAGES, DeepSeekSparseAttention, DSAConfig
from .gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from .indexer import LightningIndexer
from .mlp import SwiGLU
from .moe import MoE
from .norm import GatedRMSNorm, RMSNorm
from .sequence import SequenceInfo

__all__ = ["Attention", "AttentionConfig", "DeepSeekSparseAttention", "DSAConfig", "DSA_STAGES", "GatedDeltaNet",
           "GatedDeltaNetConfig", "LightningIndexer", "SwiGLU", "MoE", "RMSNorm", "GatedRMSNorm", "SequenceInfo"]
