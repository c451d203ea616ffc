"""Stage 1: step sizes and their cumulative log-decay within each chunk; and its backward.

dt_out[b, h, c, s] = clamp(softplus(dt + dt_bias), dt_limit)  (softplus only when asked)
dA_cs[b, h, c, s]  = sum_{r <= s} dt_out[b, h, c, r] * A[h]   (positions past seqlen: dt_out = 0)
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import fast_launch


@triton.jit
def _softplus(v):
    # log(1 + e^v) without overflow; above 20 it equals v in fp32
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))), v)


@fast_launch
@triton.jit
def _chunk_cumsum_fwd_kernel(
    dt_ptr, A_ptr, bias_ptr, dt_out_ptr, dA_cs_ptr,
    seqlen, nheads, chunk_size, dt_min, dt_max,
    s_dt_b, s_dt_l, s_dt_h,
    s_o_b, s_o_h, s_o_c,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_b, pid_c, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_s = tl.arange(0, BLOCK_S)
    pos = pid_c * chunk_size + offs_s
    valid = (offs_s[:, None] < chunk_size) & (pos[:, None] < seqlen) & (offs_h[None, :] < nheads)
    dt = tl.load(dt_ptr + pid_b * s_dt_b + pos[:, None] * s_dt_l + offs_h[None, :] * s_dt_h,
                 mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        dt = _softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(valid, dt, 0.0)  # padding neither decays nor writes the state
    A = tl.load(A_ptr + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)
    dA_cs = tl.cumsum(dt * A[None, :], axis=0)
    out = pid_b * s_o_b + offs_h[None, :] * s_o_h + pid_c * s_o_c + offs_s[:, None]
    store = (offs_s[:, None] < chunk_size) & (offs_h[None, :] < nheads)
    tl.store(dt_out_ptr + out, dt, mask=store)
    tl.store(dA_cs_ptr + out, dA_cs, mask=store)


def chunk_cumsum_fwd(dt, A, dt_bias, dt_softplus, dt_limit, chunk_size):
    """dt [b, l, h] -> (dt_out, dA_cs), both float32 [b, h, nchunks, chunk_size]."""
    batch, seqlen, nheads = dt.shape
    nchunks = triton.cdiv(seqlen, chunk_size)
    dt_out = torch.empty(batch, nheads, nchunks, chunk_size, device=dt.device, dtype=torch.float32)
    dA_cs = torch.empty_like(dt_out)
    clamp = tuple(dt_limit) != (0.0, math.inf)
    block_h = min(triton.next_power_of_2(nheads), 16)
    grid = (batch, nchunks, triton.cdiv(nheads, block_h))
    _chunk_cumsum_fwd_kernel[grid](
        dt, A, dt_bias if dt_bias is not None else A, dt_out, dA_cs,
        seqlen, nheads, chunk_size, float(dt_limit[0]), float(dt_limit[1]),
        dt.stride(0), dt.stride(1), dt.stride(2),
        dt_out.stride(0), dt_out.stride(1), dt_out.stride(2),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp,
        BLOCK_H=block_h, BLOCK_S=triton.next_power_of_2(chunk_size),
    )
    return dt_out, dA_cs


@fast_launch
@triton.jit
def _chunk_cumsum_bwd_kernel(
    dt_ptr, A_ptr, bias_ptr, dt_out_ptr, dda_ptr, ddt_part_ptr, dda_last_ptr,
    ddt_in_ptr, dA_part_ptr,
    seqlen, nheads, chunk_size, dt_min, dt_max,
    s_dt_b, s_dt_l, s_dt_h,
    s_o_b, s_o_h, s_o_c,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, HAS_DDA_LAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dda = d loss / d dA_cs and ddt_part = d loss / d dt_out (direct terms) -> d loss / d dt (raw
    input) and per-(b, c, h) partial sums of d loss / d A. dda_last [b, h, nchunks], when given, is
    added to dda at each chunk's last position (the chunk total's gradient)."""
    pid_b, pid_c, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_s = tl.arange(0, BLOCK_S)
    pos = pid_c * chunk_size + offs_s
    valid = (offs_s[:, None] < chunk_size) & (pos[:, None] < seqlen) & (offs_h[None, :] < nheads)
    inter = pid_b * s_o_b + offs_h[None, :] * s_o_h + pid_c * s_o_c + offs_s[:, None]
    # all chunk_size positions: the padded tail holds the chunk total's gradient at its end
    dda = tl.load(dda_ptr + inter, mask=(offs_s[:, None] < chunk_size) & (offs_h[None, :] < nheads), other=0.0)
    if HAS_DDA_LAST:
        last = tl.load(dda_last_ptr + (pid_b * nheads + offs_h) * tl.num_programs(1) + pid_c,
                       mask=offs_h < nheads, other=0.0)
        dda += tl.where(offs_s[:, None] == chunk_size - 1, last[None, :], 0.0)
    # dA_cs[s] = sum_{r <= s} dA[r]: the gradient of dA[r] is the reverse cumsum of dda
    ddA = tl.sum(dda, axis=0)[None, :] - tl.cumsum(dda, axis=0) + dda
    dt_used = tl.load(dt_out_ptr + inter, mask=valid, other=0.0)
    A = tl.load(A_ptr + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)
    tl.store(dA_part_ptr + (pid_b * tl.num_programs(1) + pid_c) * nheads + offs_h,
             tl.sum(ddA * dt_used, axis=0), mask=offs_h < nheads)
    g = tl.load(ddt_part_ptr + inter, mask=valid, other=0.0) + ddA * A[None, :]
    # chain rule back through clamp and softplus, recomputed from the raw input
    raw = tl.load(dt_ptr + pid_b * s_dt_b + pos[:, None] * s_dt_l + offs_h[None, :] * s_dt_h,
                  mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)[None, :]
    if CLAMP:
        v = _softplus(raw) if SOFTPLUS else raw
        g = tl.where((v >= dt_min) & (v <= dt_max), g, 0.0)
    if SOFTPLUS:
        g = g * tl.sigmoid(raw)
    tl.store(ddt_in_ptr + pid_b * s_dt_b + pos[:, None] * s_dt_l + offs_h[None, :] * s_dt_h, g, mask=valid)


def chunk_cumsum_bwd(dt, A, dt_bias, dt_softplus, dt_limit, chunk_size, dt_out, dda, ddt_part, dda_last=None):
    """Gradients through stage 1: returns ddt [b, l, h] float32, dA [h] float32, ddt_bias [h] or None.

    dda, ddt_part: float32 [b, h, nchunks, chunk_size], gradients w.r.t. dA_cs and dt_out;
    dda_last: float32 [b, h, nchunks] or None, more gradient w.r.t. each chunk's last dA_cs entry.
    """
    batch, seqlen, nheads = dt.shape
    nchunks = dt_out.shape[2]
    ddt = torch.empty(batch, seqlen, nheads, device=dt.device, dtype=torch.float32)
    dA_part = torch.empty(batch, nchunks, nheads, device=dt.device, dtype=torch.float32)
    block_h = min(triton.next_power_of_2(nheads), 16)
    grid = (batch, nchunks, triton.cdiv(nheads, block_h))
    _chunk_cumsum_bwd_kernel[grid](
        dt, A, dt_bias if dt_bias is not None else A, dt_out, dda, ddt_part,
        dda_last.contiguous() if dda_last is not None else dda, ddt, dA_part,
        seqlen, nheads, chunk_size, float(dt_limit[0]), float(dt_limit[1]),
        ddt.stride(0), ddt.stride(1), ddt.stride(2),
        dt_out.stride(0), dt_out.stride(1), dt_out.stride(2),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=tuple(dt_limit) != (0.0, math.inf),
        HAS_DDA_LAST=dda_last is not None, BLOCK_H=block_h, BLOCK_S=triton.next_power_of_2(chunk_size),
    )
    ddt_bias = ddt.sum((0, 1)) if dt_bias is not None else None
    return ddt, dA_part.sum((0, 1)), ddt_bias
