"""hybrid-zoo layers: every sequence mixer and channel mixer obeys one contract.

    forward(x, *, state=None, seq_idx=None) -> y          x, y: [batch, seqlen, d_model]
    init_state(batch_size, *, dtype=None, device=None)   the inference state forward continues from

MoE's forward returns (y, aux_losses) so the model can add the auxiliary losses explicitly.
"""
from .attention import Attention, KVCache
from .bidirectional import BiMamba, Bidirectional
from .mamba import Mamba, MambaState
from .mamba2 import Mamba2, Mamba2State
from .mlp import MLP
from .moe import MoE
from .norm import GatedRMSNorm, RMSNorm

__all__ = ["Attention", "KVCache", "BiMamba", "Bidirectional", "Mamba", "MambaState", "Mamba2", "Mamba2State",
           "MLP", "MoE", "RMSNorm", "GatedRMSNorm"]
