"""Stage 4: CB[b, c, g, t, s] = C[t] . B[s] for the positions t, s of each chunk (per group).

Only blocks that hold some s <= t are computed: the consumers read the causal half alone, and
select (never multiply) entries by their position masks, so the other half may stay unwritten.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import dot_precision, fast_launch


@fast_launch
@triton.jit
def _bmm_chunk_kernel(
    C_ptr, B_ptr, out_ptr,
    seqlen, ngroups, dstate, chunk_size, nchunks,
    s_b, s_l, s_g, s_n,
    s_o_b, s_o_c, s_o_g, s_o_t, s_o_s,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bcg = tl.program_id(0)
    pid_g = pid_bcg % ngroups
    pid_c = (pid_bcg // ngroups) % nchunks
    pid_b = pid_bcg // (ngroups * nchunks)
    pid_t, pid_s = tl.program_id(1), tl.program_id(2)
    if pid_s * BLOCK_S >= (pid_t + 1) * BLOCK_T:
        return  # entirely above the diagonal
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    base = pid_b * s_b + chunk_start * s_l + pid_g * s_g
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        c = tl.load(C_ptr + base + offs_t[:, None] * s_l + offs_n[None, :] * s_n,
                    mask=(offs_t[:, None] < chunk_len) & (offs_n[None, :] < dstate), other=0.0)
        bt = tl.load(B_ptr + base + offs_n[:, None] * s_n + offs_s[None, :] * s_l,
                     mask=(offs_n[:, None] < dstate) & (offs_s[None, :] < chunk_len), other=0.0)
        acc += tl.dot(c, bt, input_precision=DOT_PRECISION)
    out_ptr += pid_b * s_o_b + pid_c * s_o_c + pid_g * s_o_g
    tl.store(out_ptr + offs_t[:, None] * s_o_t + offs_s[None, :] * s_o_s, acc,
             mask=(offs_t[:, None] < chunk_size) & (offs_s[None, :] < chunk_size))


def bmm_chunk(C, B, chunk_size):
    """C, B [b, l, g, n] -> CB float32 [b, nchunks, g, chunk_size, chunk_size] (causal half)."""
    batch, seqlen, ngroups, dstate = B.shape
    nchunks = triton.cdiv(seqlen, chunk_size)
    out = torch.empty(batch, nchunks, ngroups, chunk_size, chunk_size, device=B.device, dtype=torch.float32)
    block = max(16, min(64, triton.next_power_of_2(chunk_size)))
    block_n = max(16, min(64, triton.next_power_of_2(dstate)))
    grid = (batch * nchunks * ngroups, triton.cdiv(chunk_size, block), triton.cdiv(chunk_size, block))
    _bmm_chunk_kernel[grid](
        C, B, out, seqlen, ngroups, dstate, chunk_size, nchunks,
        *B.stride(), *out.stride(),
        BLOCK_T=block, BLOCK_S=block, BLOCK_N=block_n, DOT_PRECISION=dot_precision(B.dtype),
        num_warps=4, num_stages=2,
    )
    return out
