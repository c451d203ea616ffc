"""Mamba-2 decode: one token's state update and output in one Triton kernel (no autograd: used for
inference with a state, as kernels.ssd.reference.ssd_step_ref specifies).

    dt' = clamp(softplus(dt + dt_bias), dt_limit);  S = exp(dt' A) S + dt' x B^T (in place)
    y = S C + D x;  y *= silu(z)

One program per (batch, head, block of headdim rows): the [rows, d_state] slice of the state is
read once and written once, so the kernel runs at memory speed and a whole step is one launch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton.launch import fast_launch


@fast_launch
@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    nheads, ngroups, headdim, dstate, dt_min, dt_max,
    s_st_b, s_st_h, s_st_p, s_st_n,
    s_x_b, s_x_h, s_x_p,
    s_z_b, s_z_h, s_z_p,
    s_dt_b, s_dt_h,
    s_B_b, s_B_g, s_B_n,
    s_C_b, s_C_g, s_C_n,
    s_D_h,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b, pid_h = tl.program_id(0), tl.program_id(1)
    pid_g = pid_h // (nheads // ngroups)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_in, n_in = offs_p < headdim, offs_n < dstate

    dt = tl.load(dt_ptr + pid_b * s_dt_b + pid_h * s_dt_h).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + pid_h).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))), dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    decay = tl.exp(dt * tl.load(A_ptr + pid_h).to(tl.float32))

    x = tl.load(x_ptr + pid_b * s_x_b + pid_h * s_x_h + offs_p * s_x_p, mask=p_in, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + pid_b * s_B_b + pid_g * s_B_g + offs_n * s_B_n, mask=n_in, other=0.0).to(tl.float32)
    c = tl.load(C_ptr + pid_b * s_C_b + pid_g * s_C_g + offs_n * s_C_n, mask=n_in, other=0.0).to(tl.float32)
    st_ptrs = (state_ptr + pid_b * s_st_b + pid_h * s_st_h + offs_p[:, None] * s_st_p
               + offs_n[None, :] * s_st_n)
    mask = p_in[:, None] & n_in[None, :]
    S = tl.load(st_ptrs, mask=mask, other=0.0).to(tl.float32)
    S = decay * S + (dt * x)[:, None] * b[None, :]
    tl.store(st_ptrs, S.to(state_ptr.dtype.element_ty), mask=mask)

    y = tl.sum(S * c[None, :], axis=1)
    if HAS_D:
        if D_PER_CHANNEL:
            d = tl.load(D_ptr + pid_h * s_D_h + offs_p, mask=p_in, other=0.0).to(tl.float32)
        else:
            d = tl.load(D_ptr + pid_h * s_D_h).to(tl.float32)
        y += d * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_z_b + pid_h * s_z_h + offs_p * s_z_p, mask=p_in, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * s_x_b + pid_h * s_x_h + offs_p * s_x_p, y.to(y_ptr.dtype.element_ty), mask=p_in)


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, math.inf)):
    """state [b, h, p, n] (updated in place), x, z [b, h, p], dt [b, h], A [h], B, C [b, g, n],
    D [h] or [h, p], dt_bias [h] -> y [b, h, p] in x's dtype (arguments checked by the interface)."""
    batch, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1:]
    x = x.contiguous()  # y is written with x's strides
    y = torch.empty_like(x)
    block_n = max(16, triton.next_power_of_2(dstate))
    block_p = max(1, min(triton.next_power_of_2(headdim), 4096 // block_n))
    grid = (batch, nheads, triton.cdiv(headdim, block_p))
    D_c = D.contiguous() if D is not None else None
    bias = dt_bias.contiguous() if dt_bias is not None else None
    zz = z if z is not None else x
    _ssd_step_kernel[grid](
        state, x, dt, A, B, C, D_c if D_c is not None else A, zz, bias if bias is not None else A, y,
        nheads, ngroups, headdim, dstate, float(dt_limit[0]), float(dt_limit[1]),
        *state.stride(), *x.stride(), *zz.stride(), *dt.stride(), *B.stride(), *C.stride(),
        D_c.stride(0) if D_c is not None else 0,
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=tuple(dt_limit) != (0.0, math.inf),
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4,
    )
    return y
