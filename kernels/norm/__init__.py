"""Fused gated RMSNorm (Mamba-2's output norm: RMSNorm of y * silu(z), grouped), forward and
backward in Triton; specification in reference.py."""
from .interface import gated_rms_norm

__all__ = ["gated_rms_norm"]
