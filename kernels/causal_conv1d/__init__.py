"""Causal depthwise conv1d with state and packed-document support.

The public op is `causal_conv1d`; its specification is `reference.causal_conv1d_ref`.
"""
from .interface import causal_conv1d

__all__ = ["causal_conv1d"]
