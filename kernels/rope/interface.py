"""Dispatch for the rotary embedding: the Triton kernel on CUDA (or under TRITON_INTERPRET=1), the
reference otherwise or when HYBRID_ZOO_KERNELS=reference."""
from __future__ import annotations

import os

import torch

from ..backend import resolve_backend
from .reference import apply_rope_ref
from .triton import triton

if triton is not None:
    from .triton import _rope_op


def _use_triton(x: torch.Tensor) -> bool:
    if triton is None or resolve_backend() == "reference":
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of every head (fp32 math, output in x's dtype).

    x: [batch, seqlen, nheads, head_dim]; cos, sin: [seqlen, rotary_dim / 2] from rope_cos_sin or
    RopeTable -> [batch, seqlen, nheads, head_dim]. On CUDA one fused Triton kernel (forward and
    backward; the PyTorch version takes 5-6 passes over x); HYBRID_ZOO_KERNELS=reference forces
    apply_rope_ref.
    """
    if _use_triton(x):
        return _rope_op(x, cos.contiguous(), sin.contiguous(), False)
    return apply_rope_ref(x, cos, sin)
