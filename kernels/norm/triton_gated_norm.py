"""Fused gated RMSNorm, forward and backward, in Triton: one program per (row block, group), one
pass over x and z each way; the backward recomputes the gate and the norm from x, z and the saved
per-group reciprocal RMS instead of storing intermediates.

Forward (u = x * silu(z) when gating before the norm, else u = x):
    r = rsqrt(mean_group(u^2) + eps);  n = u * r;  y = n * w  (* silu(z) when norm_before_gate)
Backward, per group of G channels, with g = dy * w (* silu(z) when norm_before_gate):
    du = r * (g - n * mean_group(g * n));   dw = sum_rows dy * n (* silu(z))
    dx = du * silu(z) (or du);  dz = du * x * silu'(z)  (or dy * n * w * silu'(z) after the norm)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# launches with less Python per call (the norm runs once per Mamba2 layer call)
from ..ssd.triton.launch import fast_launch


@fast_launch
@triton.jit
def _gated_norm_fwd_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr,
    nrows, d, group_size, eps,
    s_x, s_z, s_y,
    HAS_Z: tl.constexpr, HAS_W: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    cols = group * group_size + tl.arange(0, BLOCK_G)
    mask = (rows[:, None] < nrows) & (tl.arange(0, BLOCK_G)[None, :] < group_size)
    u = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * s_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            u = u * gate
    rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=1) / group_size + eps)
    tl.store(rstd_ptr + group * nrows + rows, rstd, mask=rows < nrows)
    y = u * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y = y * gate
    tl.store(y_ptr + rows[:, None] * s_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _gated_norm_bwd_kernel(
    x_ptr, z_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dz_ptr, dw_part_ptr,
    nrows, d, group_size,
    s_x, s_z, s_dy,
    HAS_Z: tl.constexpr, HAS_W: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_r = tl.program_id(0)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    cols = group * group_size + tl.arange(0, BLOCK_G)
    mask = (rows[:, None] < nrows) & (tl.arange(0, BLOCK_G)[None, :] < group_size)
    x = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows[:, None] * s_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + group * nrows + rows, mask=rows < nrows, other=0.0)
    u = x
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * s_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        gate = z * sig
        dgate = sig * (1.0 + z * (1.0 - sig))
        if not NORM_BEFORE_GATE:
            u = x * gate
    n = u * rstd[:, None]
    g = dy
    if HAS_Z:
        if NORM_BEFORE_GATE:
            g = dy * gate
    # the weight's gradient: one partial row per program, summed outside in a fixed order
    tl.store(dw_part_ptr + pid_r * d + cols, tl.sum(g * n, axis=0), mask=cols < d)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)
        g = g * w[None, :]
    du = rstd[:, None] * (g - n * (tl.sum(g * n, axis=1) / group_size)[:, None])
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y_pre = n
            if HAS_W:
                y_pre = y_pre * w[None, :]
            dz = dy * y_pre * dgate
            dx = du
        else:
            dz = du * x * dgate
            dx = du * gate
        tl.store(dz_ptr + rows[:, None] * s_z + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        dx = du
    tl.store(dx_ptr + rows[:, None] * s_x + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _block_rows(nrows, block_g):
    # about 4K elements per program, at least one row
    return max(1, min(triton.next_power_of_2(nrows), 4096 // block_g))


def gated_norm_fwd(x, z, weight, eps, group_size, norm_before_gate):
    """x, z [rows, d] contiguous -> (y [rows, d] in x's dtype, rstd float32 [ngroups, rows])."""
    nrows, d = x.shape
    block_g = triton.next_power_of_2(group_size)
    block_r = _block_rows(nrows, block_g)
    y = torch.empty_like(x)
    rstd = torch.empty(d // group_size, nrows, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(nrows, block_r), d // group_size)
    _gated_norm_fwd_kernel[grid](
        x, z if z is not None else x, weight if weight is not None else x, y, rstd,
        nrows, d, group_size, eps, x.stride(0), z.stride(0) if z is not None else 0, y.stride(0),
        HAS_Z=z is not None, HAS_W=weight is not None, NORM_BEFORE_GATE=norm_before_gate,
        BLOCK_R=block_r, BLOCK_G=block_g, num_warps=4 if block_g * block_r <= 4096 else 8,
    )
    return y, rstd


def gated_norm_bwd(dy, x, z, weight, rstd, group_size, norm_before_gate):
    """-> dx (x's dtype), dz (z's dtype) or None, dweight float32 [d] or None."""
    nrows, d = x.shape
    block_g = triton.next_power_of_2(group_size)
    block_r = _block_rows(nrows, block_g)
    nprog = triton.cdiv(nrows, block_r)
    dx = torch.empty_like(x)
    dz = torch.empty_like(z) if z is not None else None
    dw_part = torch.empty(nprog, d, device=x.device, dtype=torch.float32)
    _gated_norm_bwd_kernel[(nprog, d // group_size)](
        x, z if z is not None else x, weight if weight is not None else x, rstd, dy, dx,
        dz if dz is not None else dx, dw_part,
        nrows, d, group_size, x.stride(0), z.stride(0) if z is not None else 0, dy.stride(0),
        HAS_Z=z is not None, HAS_W=weight is not None, NORM_BEFORE_GATE=norm_before_gate,
        BLOCK_R=block_r, BLOCK_G=block_g, num_warps=4 if block_g * block_r <= 4096 else 8,
    )
    return dx, dz, (dw_part.sum(0) if weight is not None else None)
