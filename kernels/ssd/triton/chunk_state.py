"""Stage 2: each chunk's own contribution to the state (and, reused by the backward, the gradient
that a chunk's outputs send to the state entering it).

forward  (TO_END=True):  out[b, c, h] = sum_s exp(dA_cs[last] - dA_cs[s]) dt[s] x[s]^T B[s]
                         over the tokens s of the chunk's last document
backward (TO_END=False): out[b, c, h] = sum_s exp(dA_cs[s]) dy[s]^T C[s]
                         over the tokens s of the document that the entering state belongs to
out: float32 [b, nchunks, nheads, headdim, d_state].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CONFIG = dict(block_p=64, block_n=128, block_s=64, num_warps=4, num_stages=2)


@triton.jit
def _chunk_state_kernel(
    x_ptr, B_ptr, dt_ptr, dA_cs_ptr, seq_idx_ptr, out_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_dt_b, s_dt_h, s_dt_c,
    s_sq_b, s_sq_l,
    s_o_b, s_o_c, s_o_h, s_o_p, s_o_n,
    TO_END: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
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
        acc += tl.dot(xt, b_hi)
        if SPLIT:
            # the scaled B is not representable in bf16/fp16: add the rounding remainder as a second
            # dot, so the states are accurate to ~fp32 (the backward's decay gradient subtracts
            # large terms computed from them)
            acc += tl.dot(xt, (bf - b_hi.to(tl.float32)).to(xt.dtype))
    out_ptr += pid_b * s_o_b + pid_c * s_o_c + pid_h * s_o_h
    tl.store(out_ptr + offs_p[:, None] * s_o_p + offs_n[None, :] * s_o_n, acc,
             mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate))


def chunk_state(x, B, dt_out, dA_cs, seq_idx, chunk_size, to_end=True):
    """x [b, l, h, p] (or dy), B [b, l, g, n] (or C), dt_out/dA_cs [b, h, nchunks, chunk_size]
    -> float32 [b, nchunks, h, p, n]; see the module docstring for the two modes."""
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
    _chunk_state_kernel[grid](
        x, B, dt_out, dA_cs, sq, out,
        seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks,
        *x.stride(), *B.stride(),
        dt_out.stride(0), dt_out.stride(1), dt_out.stride(2),
        sq.stride(0), sq.stride(1),
        *out.stride(),
        TO_END=to_end, HAS_SEQ_IDX=seq_idx is not None, SPLIT=x.dtype != torch.float32,
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_S=block_s,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
