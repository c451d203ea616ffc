"""Rotary position embedding applied to [batch, seqlen, nheads, head_dim] tensors.

`apply_rope` is the public op; `reference.apply_rope_ref` its specification.
"""
from .interface import apply_rope
from .reference import apply_rope_ref

__all__ = ["apply_rope", "apply_rope_ref"]
