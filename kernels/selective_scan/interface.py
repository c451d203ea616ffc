"""Argument checks and dispatch for the selective scan op."""
from __future__ import annotations

import torch

from ..backend import resolve_backend
from .reference import selective_scan_ref


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused_module():
    """kernels.selective_scan.fused if it is importable (it is optional), else None."""
    try:
        from . import fused
    except ImportError:
        return None
    return fused


def _use_fused(u: torch.Tensor, backend: str) -> bool:
    """The one place that picks the path: the fused kernel only for CUDA inputs in a dtype it takes
    (fp32, fp16, bf16; float64 stays on the reference), when the backend allows it and
    kernels/selective_scan/fused.py imports and its `available()` says it is built.
    (fused.py exports available() and selective_scan_fn with this file's signature.)"""
    if backend == "reference" or not u.is_cuda or u.dtype not in _FUSED_DTYPES:
        return False
    fused = _fused_module()
    return (fused is not None and hasattr(fused, "available") and hasattr(fused, "selective_scan_fn")
            and bool(fused.available()))


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx):
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [batch, dim, seqlen], got shape {tuple(u.shape)}")
    batch, dim, seqlen = u.shape
    if seqlen == 0:
        raise ValueError("selective_scan: u has seqlen 0; pass at least one token")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape [batch={batch}, dim={dim}, "
                         f"seqlen={seqlen}], got {tuple(delta.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: A must be real (complex A is not supported); "
                         "pass A = -exp(A_log) as a real [dim, dstate] tensor")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be [dim={dim}, dstate], got {tuple(A.shape)}")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            if t.shape != (batch, dstate, seqlen):
                raise ValueError(f"selective_scan: 3-D {name} must be [batch={batch}, dstate={dstate}, "
                                 f"seqlen={seqlen}], got {tuple(t.shape)}")
        elif t.dim() == 4:
            groups = t.shape[1]
            if t.shape != (batch, groups, dstate, seqlen) or groups == 0:
                raise ValueError(f"selective_scan: {name} must be [batch={batch}, groups, dstate={dstate}, "
                                 f"seqlen={seqlen}], got {tuple(t.shape)}")
            if dim % groups:
                raise ValueError(f"selective_scan: {name} has groups={groups}, which must divide dim={dim}: "
                                 f"each group's B and C are shared by dim / groups channels")
        else:
            raise ValueError(f"selective_scan: {name} must be [batch, groups, dstate, seqlen] or "
                             f"[batch, dstate, seqlen], got shape {tuple(t.shape)}")
    if B.dim() != C.dim() or (B.dim() == 4 and B.shape[1] != C.shape[1]):
        raise ValueError(f"selective_scan: B {tuple(B.shape)} and C {tuple(C.shape)} must have the same "
                         f"number of groups")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be [dim={dim}], got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and initial_state.shape != (batch, dim, dstate):
        raise ValueError(f"selective_scan: initial_state must be [batch={batch}, dim={dim}, dstate={dstate}], "
                         f"got {tuple(initial_state.shape)}")
    if seq_idx is not None:
        if seq_idx.shape != (batch, seqlen):
            raise ValueError(f"selective_scan: seq_idx must be [batch={batch}, seqlen={seqlen}], "
                             f"got {tuple(seq_idx.shape)}")
        if seq_idx.dtype != torch.int32:
            raise ValueError(f"selective_scan: seq_idx must be int32, got {seq_idx.dtype}; "
                             f"pass seq_idx.to(torch.int32)")


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False, initial_state: torch.Tensor | None = None,
                      seq_idx: torch.Tensor | None = None, backend: str | None = None):
    """Mamba-1's selective scan; u, delta, z [batch, dim, seqlen], A [dim, dstate],
    B, C [batch, groups, dstate, seqlen] or [batch, dstate, seqlen] -> out [batch, dim, seqlen]
    (and last_state [batch, dim, dstate] fp32 when return_last_state).

    backend: "auto" | "reference" | "fused" (default: env HYBRID_ZOO_KERNELS, else "auto").
    See reference.selective_scan_ref for the exact semantics of initial_state and seq_idx.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    choice = resolve_backend(backend)
    if _use_fused(u, choice):
        return _fused_module().selective_scan_fn(
            u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
            return_last_state=return_last_state, initial_state=initial_state, seq_idx=seq_idx)
    if choice == "fused":
        raise RuntimeError("selective_scan: the fused kernel cannot run this input (it needs CUDA and a "
                           "built kernels.selective_scan.fused); set HYBRID_ZOO_KERNELS=auto or "
                           "backend='auto' to fall back to the reference")
    return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=delta_softplus, return_last_state=return_last_state,
                              initial_state=initial_state, seq_idx=seq_idx)
