"""Argument checks and dispatch for the fused gated RMSNorm (Mamba-2's output norm).

Backend choice as every kernel (kernels/backend.py): backend= per call, else HYBRID_ZOO_KERNELS;
"auto" takes the Triton kernel for CUDA inputs when Triton imports, the reference otherwise.
The kernel is a torch.library custom op with a fake implementation: torch.compile traces it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..backend import resolve_backend
from .reference import gated_rms_norm_ref

# Triton is imported on first use, not with the layers (importing it early would fix its
# interpreter mode for the whole process)
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _tk():
    from . import triton_gated_norm
    return triton_gated_norm


def available() -> bool:
    """The Triton kernel can run: Triton is installed and there is a GPU (or TRITON_INTERPRET=1)."""
    return _HAVE_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _use_fused(x: torch.Tensor, backend: str) -> bool:
    if backend == "reference" or not available():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if _HAVE_TRITON:
    @torch.library.custom_op("hybrid_zoo::gated_rms_norm_fwd", mutates_args=())
    def _fwd_op(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                group_size: int, norm_before_gate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk().gated_norm_fwd(x, z, weight, eps, group_size, norm_before_gate)

    @_fwd_op.register_fake
    def _(x, z, weight, eps, group_size, norm_before_gate):
        return torch.empty_like(x), x.new_empty(x.shape[1] // group_size, x.shape[0], dtype=torch.float32)

    @torch.library.custom_op("hybrid_zoo::gated_rms_norm_bwd", mutates_args=())
    def _bwd_op(dy: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor | None,
                rstd: torch.Tensor, group_size: int, norm_before_gate: bool) -> list[torch.Tensor]:
        dx, dz, dw = _tk().gated_norm_bwd(dy, x, z, weight, rstd, group_size, norm_before_gate)
        return [dx, dz if dz is not None else x.new_empty(0), dw if dw is not None else x.new_empty(0)]

    @_bwd_op.register_fake
    def _(dy, x, z, weight, rstd, group_size, norm_before_gate):
        return [torch.empty_like(x), torch.empty_like(z) if z is not None else x.new_empty(0),
                x.new_empty(weight.shape, dtype=torch.float32) if weight is not None else x.new_empty(0)]

    def _setup_context(ctx, inputs, output):
        x, z, weight, eps, group_size, norm_before_gate = inputs
        ctx.save_for_backward(x, z, weight, output[1])
        ctx.args = (group_size, norm_before_gate)

    def _backward(ctx, dy, _drstd):
        x, z, weight, rstd = ctx.saved_tensors
        dx, dz, dw = _bwd_op(dy.contiguous(), x, z, weight, rstd, *ctx.args)
        return (dx, dz if z is not None else None, dw.to(weight.dtype) if weight is not None else None,
                None, None, None)

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor | None, eps: float = 1e-5,
                   group_size: int | None = None, norm_before_gate: bool = False,
                   backend: str | None = None) -> torch.Tensor:
    """RMSNorm(x * silu(z)) * weight over groups of `group_size` channels (or RMSNorm(x) * weight *
    silu(z) with norm_before_gate). x, z: [..., d]; weight: [d] -> y [..., d] in x's dtype.
    Semantics: kernels/norm/reference.py (= layers.norm.gated_rms_norm)."""
    d = x.shape[-1]
    group_size = group_size or d
    if group_size <= 0 or d % group_size:
        raise ValueError(f"gated_rms_norm: group_size={group_size} must divide the width d={d} "
                         f"(set ngroups so that d / ngroups is whole)")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"gated_rms_norm: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if weight is not None and weight.shape != (d,):
        raise ValueError(f"gated_rms_norm: weight must be [d={d}], got {tuple(weight.shape)}")
    choice = resolve_backend(backend)
    if not _use_fused(x, choice) or group_size > 65536:
        if choice == "fused":
            raise RuntimeError("gated_rms_norm: backend='fused' was asked for but the Triton kernel cannot "
                               "run here (needs Triton and a CUDA input); use backend='auto'")
        return gated_rms_norm_ref(x, z, weight, eps, group_size, norm_before_gate)
    shape = x.shape
    x2 = x.reshape(-1, d).contiguous()
    z2 = z.reshape(-1, d).contiguous() if z is not None else None
    y, _ = _fwd_op(x2, z2, weight.contiguous() if weight is not None else None, float(eps), int(group_size),
                   bool(norm_before_gate))
    return y.view(shape)
