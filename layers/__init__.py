"""hybrid-zoo layers: every sequence mixer and channel mixer obeys one contract.

    forward(x, *, state=None, seq_idx=None) -> y          x, y: [batch, seqlen, d_model]
    init_state(batch_size, *, dtype=None, device=None)   the inference state forward continues from

MoE's forward returns (y, aux_losses) so the model can add the auxiliary losses explicitly.
"""
from .norm import GatedRMSNorm, RMSNorm

__all__ = ["RMSNorm", "GatedRMSNorm"]
