"""Normalisation layers: RMSNorm and the gated RMSNorm of Mamba-2.

x: [..., d] -> y: [..., d]; statistics are computed in fp32 and cast back to the input dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.norm import gated_rms_norm as fused_gated_rms_norm
from kernels.norm.reference import gated_rms_norm_ref as gated_rms_norm  # noqa: F401  (the specification)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs; float64 inputs stay float64 (exact comparisons in tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, in fp32; x: [..., d], weight: [d] or None."""
    xf = x.to(_compute_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019).

    d: normalised width; eps: added to the mean square; weight: learned scale (False gives the
    weightless norm Falcon Mamba applies to dt, B and C).
    """

    def __init__(self, d: int, eps: float = 1e-5, weight: bool = True, device=None, dtype=None):
        super().__init__()
        if d <= 0:
            raise ValueError(f"RMSNorm width d={d} must be positive")
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d:
            raise ValueError(f"RMSNorm expects last dimension {self.d}, got input of shape {tuple(x.shape)}")
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d}, eps={self.eps}, weight={self.weight is not None}"


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z), grouped (Mamba-2, Dao & Gu 2024, section 7).

    d: width; group_size: channels per normalisation group (d // ngroups); norm_before_gate:
    normalise first, then gate (False in every published Mamba-2 checkpoint).
    """

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = False, device=None, dtype=None):
        super().__init__()
        group_size = group_size or d
        if d % group_size:
            raise ValueError(f"GatedRMSNorm: group_size={group_size} must divide d={d} "
                             f"(set ngroups so that d_ssm / ngroups is whole)")
        self.d, self.eps, self.group_size, self.norm_before_gate = d, eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if x.is_cuda:  # fused Triton kernel, same math (kernels/norm; HYBRID_ZOO_KERNELS=reference opts out)
            return fused_gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return f"{self.d}, eps={self.eps}, group_size={self.group_size}, norm_before_gate={self.norm_before_gate}"
