"""Gated RMSNorm of Mamba-2 in plain PyTorch: the specification of kernels.norm.

layers.norm.gated_rms_norm is this function (layers import kernels, never the reverse):

    norm_before_gate=False:  y = RMSNorm_g(x * silu(z)) * weight
    norm_before_gate=True:   y = RMSNorm_g(x) * weight * silu(z)

RMSNorm_g normalises each group of `group_size` consecutive channels by its own root mean square
(+ eps). x, z: [..., d]; weight: [d] or None; statistics in float32 (float64 inputs stay
float64), output in x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_rms_norm_ref(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                       group_size: int | None = None, norm_before_gate: bool = False) -> torch.Tensor:
    d = x.shape[-1]
    group_size = group_size or d
    if d % group_size:
        raise ValueError(f"gated_rms_norm: group_size={group_size} must divide the width {d}")
    cd = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(cd)
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.to(cd))
    xg = xf.unflatten(-1, (d // group_size, group_size))
    y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    if weight is not None:
        y = y * weight.to(cd)
    if z is not None and norm_before_gate:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype)
