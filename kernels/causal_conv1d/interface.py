"""Argument checks and dispatch for the causal conv1d op."""
from __future__ import annotations

import torch

from ..backend import resolve_backend
from .reference import causal_conv1d_ref


def _check(x, weight, bias, conv_state, seq_idx):
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [batch, seqlen, dim], got shape {tuple(x.shape)}")
    batch, seqlen, dim = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"causal_conv1d: weight must be [dim={dim}, width], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"causal_conv1d: bias must be [dim={dim}], got {tuple(bias.shape)}")
    width = weight.shape[1]
    if conv_state is not None and conv_state.shape != (batch, dim, width - 1):
        raise ValueError(f"causal_conv1d: conv_state must be [batch={batch}, dim={dim}, width-1={width - 1}], "
                         f"got {tuple(conv_state.shape)}")
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise ValueError(f"causal_conv1d: seq_idx must be [batch={batch}, seqlen={seqlen}], got {tuple(seq_idx.shape)}")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, conv_state: torch.Tensor | None = None,
                  seq_idx: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal depthwise conv1d; x [batch, seqlen, dim], weight [dim, width] -> y [batch, seqlen, dim].

    See reference.causal_conv1d_ref for the exact semantics of conv_state and seq_idx.
    """
    _check(x, weight, bias, conv_state, seq_idx)
    choice = resolve_backend(backend)
    if choice != "reference" and x.is_cuda:
        from . import triton as fused                      # Triton kernel (fwd + bwd); needs CUDA
        if fused.available():
            return fused.causal_conv1d_fused(x, weight, bias, activation, conv_state, seq_idx)
    if choice == "fused":
        raise RuntimeError("causal_conv1d: no fused kernel is available for this input; "
                           "set HYBRID_ZOO_KERNELS=auto to fall back to the reference")
    return causal_conv1d_ref(x, weight, bias, activation, conv_state, seq_idx)
