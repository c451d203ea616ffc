"""Stage 2: each chunk's own contribution to the state (and, reused by the backward, the gradient
that a chunk's outputs send to the state entering it).

forward  (TO_END=True):  out[b, c, h] = sum_s exp(dA_cs[last] - dA_cs[s]) dt[s] x[s]^T B[s]
                         over the tokens s of the chunk's last document
backward (TO_END=False): out[b, c, h] = sum_s exp(dA_cs[s]) dy[s]^T C[s]
                         over the tokens s of the document that the entering state belongs to
out: float32 [b, nchunks, nheads, headdim, d_state].

chunk_state_fwd also does stage 1 (chunk_cumsum) in the same launch: each program computes dt_out
and dA_cs of its (batch, chunk, head) from the raw dt, writes them for the later stages and reads
them back (one launch fewer: small shapes are launch-bound).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .chunk_cumsum import _softplus
from .launch import dot_precision, fast_launch

CONFIG = dict(block_p=64, block_n=128, block_s=64, num_warps=4, num_stages=2)


@fast_launch
@triton.jit
def _chunk_state_kernel(
    x_ptr, B_ptr, dt_ptr, dA_cs_ptr, seq_idx_ptr, out_ptr,
    raw_dt_ptr, A_ptr, bias_ptr, dt_min, dt_max, s_r_b, s_r_l, s_r_h,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_dt_b, s_dt_h, s_dt_c,
    s_sq_b, s_sq_l,
    s_o_b, s_o_c, s_o_h, s_o_p, s_o_n,
    TO_END: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, SPLIT: tl.constexpr,
    CUMSUM: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bch = tl.program_id(0)
    pid_h = pid_bch % nheads
    pid_c = (pid_bch // nheads) % nchunks
    pid_b = pid_bch // (nheads * nchunks)
    pid_g = pid_h // (nheads // ngroups)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)

    x_ptr += pid_b * s_x_b + chunk_start * s_x_l + pid_h * s_x_h
    B_ptr += pid_b * s_B_b + chunk_start * s_B_l + pid_g * s_B_g
    dt_ptr += pid_b * s_dt_b + pid_h * s_dt_h + pid_c * s_dt_c
    dA_cs_ptr += pid_b * s_dt_b + pid_h * s_dt_h + pid_c * s_dt_c
    if CUMSUM:
        # stage 1 for this (batch, chunk, head), as chunk_cumsum computes it. Every program of the
        # head (one per p/n block) writes the same values, and reads back only after the barrier.
        offs_q = tl.arange(0, BLOCK_Q)
        q_in = offs_q < chunk_len
        dt_q = tl.load(raw_dt_ptr + pid_b * s_r_b + (chunk_start + offs_q) * s_r_l + pid_h * s_r_h,
                       mask=q_in, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_q += tl.load(bias_ptr + pid_h).to(tl.float32)
        if SOFTPLUS:
            dt_q = _softplus(dt_q)
        if CLAMP:
            dt_q = tl.minimum(tl.maximum(dt_q, dt_min), dt_max)
        dt_q = tl.where(q_in, dt_q, 0.0)  # padding neither decays nor writes the state
        dA_q = tl.cumsum(dt_q * tl.load(A_ptr + pid_h).to(tl.float32), axis=0)
        tl.store(dt_ptr + offs_q, dt_q, mask=offs_q < chunk_size)
        tl.store(dA_cs_ptr + offs_q, dA_q, mask=offs_q < chunk_size)
        tl.debug_barrier()
    dA_last = tl.load(dA_cs_ptr + chunk_len - 1)
    if HAS_SEQ_IDX:
        seq_idx_ptr += pid_b * s_sq_b + chunk_start * s_sq_l
        if TO_END:
            doc = tl.load(seq_idx_ptr + (chunk_len - 1) * s_sq_l)
        else:
            doc = tl.load(seq_idx_ptr - s_sq_l * tl.minimum(pid_c, 1))

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for s0 in range(0, chunk_len, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_chunk = offs_s < chunk_len
        # x^T tile [p, s] read straight from memory in transposed order
        xt = tl.load(x_ptr + offs_p[:, None] * s_x_p + offs_s[None, :] * s_x_l,
                     mask=(offs_p[:, None] < headdim) & in_chunk[None, :], other=0.0)
        b = tl.load(B_ptr + offs_s[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                    mask=in_chunk[:, None] & (offs_n[None, :] < dstate), other=0.0)
        dA = tl.load(dA_cs_ptr + offs_s, mask=in_chunk, other=0.0)
        if TO_END:
            dt = tl.load(dt_ptr + offs_s, mask=in_chunk, other=0.0)
            scale = tl.exp(dA_last - dA) * dt
        else:
            scale = tl.exp(dA)
        if HAS_SEQ_IDX:
            sq = tl.load(seq_idx_ptr + offs_s * s_sq_l, mask=in_chunk, other=-1)
            scale = tl.where(sq == doc, scale, 0.0)
        scale = tl.where(in_chunk, scale, 0.0)
        bf = b.to(tl.float32) * scale[:, None]
        b_hi = bf.to(xt.dtype)
        acc += tl.dot(xt, b_hi, input_precision=DOT_PRECISION)
        if SPLIT:
            # the scaled B is not representable in bf16/fp16: add the rounding remainder as a second
            # dot, so the states are accurate to ~fp32 (the backward's decay gradient subtracts
            # large terms computed from them)
            acc += tl.dot(xt, (bf - b_hi.to(tl.float32)).to(xt.dtype), input_precision=DOT_PRECISION)
    out_ptr += pid_b * s_o_b + pid_c * s_o_c + pid_h * s_o_h
    tl.store(out_ptr + offs_p[:, None] * s_o_p + offs_n[None, :] * s_o_n, acc,
             mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate))


def _launch(x, B, dt_out, dA_cs, seq_idx, chunk_size, to_end, stage1=None):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    nchunks = dt_out.shape[2]
    out = torch.empty(batch, nchunks, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    cfg = CONFIG
    block_p = max(16, min(cfg["block_p"], triton.next_power_of_2(headdim)))
    block_n = max(16, min(cfg["block_n"], triton.next_power_of_2(dstate)))
    block_s = max(16, min(cfg["block_s"], triton.next_power_of_2(chunk_size)))
    grid = (batch * nchunks * nheads, triton.cdiv(headdim, block_p), triton.cdiv(dstate, block_n))
    sq = seq_idx if seq_idx is not None else dt_out
    if stage1 is not None:
        dt, A, dt_bias, dt_softplus, dt_limit = stage1
        raw = (dt, A, dt_bias if dt_bias is not None else A, float(dt_limit[0]), float(dt_limit[1]), *dt.stride())
        flags = dict(CUMSUM=True, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
                     CLAMP=tuple(dt_limit) != (0.0, math.inf))
    else:
        raw = (dt_out, dt_out, dt_out, 0.0, 0.0, 0, 0, 0)
        flags = dict(CUMSUM=False, HAS_BIAS=False, SOFTPLUS=False, CLAMP=False)
    _chunk_state_kernel[grid](
        x, B, dt_out, dA_cs, sq, out, *raw,
        seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks,
        *x.stride(), *B.stride(),
        dt_out.stride(0), dt_out.stride(1), dt_out.stride(2),
        sq.stride(0), sq.stride(1),
        *out.stride(),
        TO_END=to_end, HAS_SEQ_IDX=seq_idx is not None, SPLIT=x.dtype != torch.float32, **flags,
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_Q=triton.next_power_of_2(chunk_size),
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def chunk_state(x, B, dt_out, dA_cs, seq_idx, chunk_size, to_end=True):
    """x [b, l, h, p] (or dy), B [b, l, g, n] (or C), dt_out/dA_cs [b, h, nchunks, chunk_size]
    -> float32 [b, nchunks, h, p, n]; see the module docstring for the two modes."""
    return _launch(x, B, dt_out, dA_cs, seq_idx, chunk_size, to_end)


def chunk_state_fwd(x, B, dt, A, dt_bias, dt_softplus, dt_limit, seq_idx, chunk_size):
    """Stages 1 and 2 in one launch: x [b, l, h, p], B [b, l, g, n], dt [b, l, h] (raw), A [h],
    dt_bias [h] or None -> (states float32 [b, nchunks, h, p, n], dt_out, dA_cs float32
    [b, h, nchunks, chunk_size]), the same as chunk_cumsum_fwd followed by chunk_state."""
    batch, seqlen, nheads = dt.shape
    nchunks = triton.cdiv(seqlen, chunk_size)
    dt_out = torch.empty(batch, nheads, nchunks, chunk_size, device=dt.device, dtype=torch.float32)
    dA_cs = torch.empty_like(dt_out)
    states = _launch(x, B, dt_out, dA_cs, seq_idx, chunk_size, True, (dt, A, dt_bias, dt_softplus, dt_limit))
    return states, dt_out, dA_cs
