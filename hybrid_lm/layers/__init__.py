"""nn.Modules: one mixer a file. Importing this package registers the built-in mixers:
`attention` (attention.py), `dsa` (dsa.py), `gated_deltanet` (gated_deltanet.py), and fla's other layers as
`fla_kda`, `fla_gla`, `fla_mamba2`, ... (fla_mixers.py; building those needs fla and a GPU). Feed-forwards: `SwiGLU`
(mlp.py) and the mixture of experts `MoE` (moe.py)."""

from . import fla_mixers  # noqa: F401  (registers the fla_* names; a module import, so HF exports leave it out)

from .attention import Attention, AttentionConfig
from .dsa import DSA_STAGES, DeepSeekSparseAttention, DSAConfig
from .gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from .indexer import LightningIndexer
from .mlp import SwiGLU
from .moe import MoE
from .norm import GatedRMSNorm, RMSNorm, matmul_dtype
from .sequence import SequenceInfo

__all__ = ["Attention", "AttentionConfig", "DeepSeekSparseAttention", "DSAConfig", "DSA_STAGES", "GatedDeltaNet",
           "GatedDeltaNetConfig", "LightningIndexer", "SwiGLU", "MoE", "RMSNorm", "GatedRMSNorm", "SequenceInfo",
           "matmul_dtype"]
