"""Argument checks and dispatch for Mamba-2's SSD scan and its decode step.

Backend choice (kernels/backend.py): backend= per call, else HYBRID_ZOO_KERNELS; "auto" takes the
fused kernels when `_use_fused` says they can run, "reference" always the plain-PyTorch reference,
"fused" the fused kernels or an error.
"""
from __future__ import annotations

import torch

from ..backend import resolve_backend
from .reference import _NO_LIMIT, mamba_chunk_scan_combined_ref, ssd_step_ref


def _fused_module():
    """kernels.ssd.fused if it exists and imports (Triton may be missing), else None."""
    try:
        from . import fused
    except ImportError:
        return None
    return fused


def _use_fused(x: torch.Tensor, backend: str) -> bool:
    """The one place that decides whether the fused kernels run this call."""
    if backend == "reference":
        return False
    fused = _fused_module()
    return fused is not None and x.is_cuda and hasattr(fused, "available") and bool(fused.available())


def _no_fused(op: str):
    return RuntimeError(f"{op}: backend='fused' was asked for but no fused SSD kernel can run here "
                        f"(needs a CUDA input and kernels/ssd/fused.py with Triton); use backend='auto' "
                        f"or HYBRID_ZOO_KERNELS=auto to fall back to the reference")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_head_args(op, nheads, headdim, A, D, dt_bias, dt_limit):
    if A.shape != (nheads,):
        raise ValueError(f"{op}: A must be [nheads={nheads}] (one decay per head), got {_shape(A)}")
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"{op}: D must be [nheads={nheads}] or [nheads={nheads}, headdim={headdim}], "
                         f"got {_shape(D)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"{op}: dt_bias must be [nheads={nheads}], got {_shape(dt_bias)}")
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"{op}: dt_limit={dt_limit} must be a pair (low, high) with low <= high")


def _check_groups(op, nheads, ngroups):
    if ngroups == 0 or nheads % ngroups:
        raise ValueError(f"{op}: ngroups={ngroups} must divide nheads={nheads}: B and C are shared by "
                         f"groups of heads; change ngroups (or the number of heads)")


def mamba_chunk_scan_combined(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, chunk_size: int, D: torch.Tensor | None = None,
                              z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                              dt_softplus: bool = False, dt_limit: tuple[float, float] = _NO_LIMIT,
                              initial_states: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                              return_final_states: bool = False, backend: str | None = None):
    """Mamba-2's SSD scan with mamba_ssm's signature.

    x [batch, seqlen, nheads, headdim]; dt [batch, seqlen, nheads]; A [nheads];
    B, C [batch, seqlen, ngroups, d_state]; D [nheads] or [nheads, headdim]; z like x;
    dt_bias [nheads]; initial_states [batch, nheads, headdim, d_state]; seq_idx int [batch, seqlen].
    Returns y like x (and final_states [batch, nheads, headdim, d_state], float32, with
    return_final_states). Semantics: kernels/ssd/reference.py.
    """
    op = "mamba_chunk_scan_combined"
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [batch, seqlen, nheads, headdim], got {_shape(x)}")
    batch, seqlen, nheads, headdim = x.shape
    if seqlen == 0:
        raise ValueError(f"{op}: x has seqlen 0; pass at least one token")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{op}: chunk_size={chunk_size!r} must be a positive int (256 is usual)")
    if dt.shape != (batch, seqlen, nheads):
        raise ValueError(f"{op}: dt must be [batch={batch}, seqlen={seqlen}, nheads={nheads}], got {_shape(dt)}")
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen):
        raise ValueError(f"{op}: B must be [batch={batch}, seqlen={seqlen}, ngroups, d_state], got {_shape(B)}")
    if C.shape != B.shape:
        raise ValueError(f"{op}: C must have B's shape {_shape(B)}, got {_shape(C)}")
    ngroups, d_state = B.shape[2:]
    _check_groups(op, nheads, ngroups)
    _check_head_args(op, nheads, headdim, A, D, dt_bias, dt_limit)
    if z is not None and z.shape != x.shape:
        raise ValueError(f"{op}: z must have x's shape {_shape(x)}, got {_shape(z)}")
    if initial_states is not None and initial_states.shape != (batch, nheads, headdim, d_state):
        raise ValueError(f"{op}: initial_states must be [batch={batch}, nheads={nheads}, headdim={headdim}, "
                         f"d_state={d_state}], got {_shape(initial_states)}")
    if seq_idx is not None:
        if seq_idx.shape != (batch, seqlen):
            raise ValueError(f"{op}: seq_idx must be [batch={batch}, seqlen={seqlen}], got {_shape(seq_idx)}")
        if seq_idx.is_floating_point():
            raise ValueError(f"{op}: seq_idx must hold integer document ids (int32), got {seq_idx.dtype}")

    choice = resolve_backend(backend)
    fused = _fused_module() if _use_fused(x, choice) else None
    if fused is not None and hasattr(fused, "mamba_chunk_scan_combined"):
        return fused.mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
            dt_limit=dt_limit, initial_states=initial_states, seq_idx=seq_idx,
            return_final_states=return_final_states)
    if choice == "fused":
        raise _no_fused(op)
    return mamba_chunk_scan_combined_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                         dt_softplus=dt_softplus, dt_limit=dt_limit,
                                         initial_states=initial_states, seq_idx=seq_idx,
                                         return_final_states=return_final_states)


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
             dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
             dt_limit: tuple[float, float] = _NO_LIMIT, backend: str | None = None) -> torch.Tensor:
    """One decode step: updates state [batch, nheads, headdim, d_state] in place, returns
    y [batch, nheads, headdim]. x, z [batch, nheads, headdim]; dt [batch, nheads]; A [nheads];
    B, C [batch, ngroups, d_state]. Semantics: reference.ssd_step_ref.
    """
    op = "ssd_step"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [batch, nheads, headdim] (one token), got {_shape(x)}")
    batch, nheads, headdim = x.shape
    if dt.shape != (batch, nheads):
        raise ValueError(f"{op}: dt must be [batch={batch}, nheads={nheads}], got {_shape(dt)}")
    if B.dim() != 3 or B.shape[0] != batch or C.shape != B.shape:
        raise ValueError(f"{op}: B and C must both be [batch={batch}, ngroups, d_state], "
                         f"got {_shape(B)} and {_shape(C)}")
    ngroups, d_state = B.shape[1:]
    _check_groups(op, nheads, ngroups)
    _check_head_args(op, nheads, headdim, A, D, dt_bias, dt_limit)
    if z is not None and z.shape != x.shape:
        raise ValueError(f"{op}: z must have x's shape {_shape(x)}, got {_shape(z)}")
    if state.shape != (batch, nheads, headdim, d_state):
        raise ValueError(f"{op}: state must be [batch={batch}, nheads={nheads}, headdim={headdim}, "
                         f"d_state={d_state}], got {_shape(state)}")

    choice = resolve_backend(backend)
    fused = _fused_module() if _use_fused(x, choice) else None
    if fused is not None and hasattr(fused, "ssd_step"):
        return fused.ssd_step(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                              dt_softplus=dt_softplus, dt_limit=dt_limit)
    if choice == "fused":
        raise _no_fused(op)
    return ssd_step_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                        dt_limit=dt_limit)
