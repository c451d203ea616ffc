"""Stage 3: the recurrence across chunks, forward and backward.

S_0 = initial state (zeros when none); for every chunk c:
    S_{c+1} = carry_c * S_c + chunk_state_c,   carry_c = exp(dA_cs[c, last]) if the chunk's last
    token is in the document S_c belongs to, else 0 (a document starts inside the chunk).
The state entering chunk c belongs to the document of the token before it (for c = 0, the
document of the first token). States are [headdim, d_state] per (batch, head), flattened here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import fast_launch


@triton.jit
def _carry(dA_cs_ptr, seq_idx_ptr, c, chunk_size, seqlen, s_sq_l, HAS_SEQ_IDX: tl.constexpr):
    """exp(total log-decay of chunk c), zeroed when a document starts inside the chunk."""
    carry = tl.exp(tl.load(dA_cs_ptr + c * chunk_size + chunk_size - 1))
    if HAS_SEQ_IDX:
        last = tl.minimum((c + 1) * chunk_size, seqlen) - 1
        prev = tl.maximum(c * chunk_size - 1, 0)
        same = tl.load(seq_idx_ptr + last * s_sq_l) == tl.load(seq_idx_ptr + prev * s_sq_l)
        carry = tl.where(same, carry, 0.0)
    return carry


@fast_launch
@triton.jit
def _state_passing_fwd_kernel(
    states_ptr, dA_cs_ptr, init_ptr, seq_idx_ptr, states_in_ptr, final_ptr,
    seqlen, nheads, dim, chunk_size, nchunks,
    s_st_b, s_st_c, s_st_h,
    s_dA_b, s_dA_h,
    s_in_b, s_in_h,
    s_sq_b, s_sq_l,
    HAS_INIT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_b, pid_h = tl.program_id(0) // nheads, tl.program_id(0) % nheads
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    states_ptr += pid_b * s_st_b + pid_h * s_st_h + offs
    states_in_ptr += pid_b * s_st_b + pid_h * s_st_h + offs
    dA_cs_ptr += pid_b * s_dA_b + pid_h * s_dA_h
    seq_idx_ptr += pid_b * s_sq_b
    if HAS_INIT:
        S = tl.load(init_ptr + pid_b * s_in_b + pid_h * s_in_h + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(nchunks):
        tl.store(states_in_ptr + c * s_st_c, S.to(states_in_ptr.dtype.element_ty), mask=mask)
        carry = _carry(dA_cs_ptr, seq_idx_ptr, c, chunk_size, seqlen, s_sq_l, HAS_SEQ_IDX)
        S = carry * S + tl.load(states_ptr + c * s_st_c, mask=mask, other=0.0)
    tl.store(final_ptr + pid_b * s_in_b + pid_h * s_in_h + offs, S, mask=mask)


def state_passing_fwd(states, dA_cs, initial_states, seq_idx, chunk_size, seqlen, out_dtype):
    """states float32 [b, nchunks, h, p, n] (chunk_state's output) -> (states_in [b, nchunks, h, p, n]
    in out_dtype: the state entering each chunk, final_states float32 [b, h, p, n])."""
    batch, nchunks, nheads, headdim, dstate = states.shape
    states_in = torch.empty(states.shape, device=states.device, dtype=out_dtype)
    final = torch.empty(batch, nheads, headdim, dstate, device=states.device, dtype=torch.float32)
    init = initial_states.contiguous() if initial_states is not None else final
    sq = seq_idx if seq_idx is not None else dA_cs
    dim = headdim * dstate
    block = min(1024, triton.next_power_of_2(dim))
    grid = (batch * nheads, triton.cdiv(dim, block))
    _state_passing_fwd_kernel[grid](
        states, dA_cs, init, sq, states_in, final,
        seqlen, nheads, dim, chunk_size, nchunks,
        states.stride(0), states.stride(1), states.stride(2),
        dA_cs.stride(0), dA_cs.stride(1),
        final.stride(0), final.stride(1),
        sq.stride(0), sq.stride(1),
        HAS_INIT=initial_states is not None, HAS_SEQ_IDX=seq_idx is not None, BLOCK=block,
        num_warps=4,
    )
    return states_in, final


@fast_launch
@triton.jit
def _state_passing_bwd_kernel(
    dstate_out_ptr, dfinal_ptr, final_ptr, states_in_ptr, dA_cs_ptr, seq_idx_ptr,
    dstates_ptr, dinit_ptr, dda_last_ptr,
    seqlen, nheads, dim, chunk_size, nchunks,
    s_st_b, s_st_c, s_st_h,
    s_dA_b, s_dA_h,
    s_in_b, s_in_h,
    s_sq_b, s_sq_l,
    HAS_DFINAL: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, BLOCK: tl.constexpr,
):
    """Reverse recurrence: dS_c = G_c + carry_c dS_{c+1}, dS_nchunks = d final state.

    Writes dstates[c] = dS_{c+1} (gradient of the state leaving chunk c, what chunk c's tokens
    wrote into), dinit = dS_0, and per block the partial sums <dS_{c+1}, S_{c+1}> = the gradient of
    chunk c's total log-decay."""
    pid_b, pid_h = tl.program_id(0) // nheads, tl.program_id(0) % nheads
    pid_k = tl.program_id(1)
    offs = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    base = pid_b * s_st_b + pid_h * s_st_h + offs
    dA_cs_ptr += pid_b * s_dA_b + pid_h * s_dA_h
    seq_idx_ptr += pid_b * s_sq_b
    fin = pid_b * s_in_b + pid_h * s_in_h + offs
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + fin, mask=mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BLOCK,), dtype=tl.float32)
    S_next = tl.load(final_ptr + fin, mask=mask, other=0.0)
    for i in range(nchunks):
        c = nchunks - 1 - i
        tl.store(dstates_ptr + base + c * s_st_c, dS, mask=mask)
        tl.store(dda_last_ptr + ((pid_b * nheads + pid_h) * nchunks + c) * tl.num_programs(1) + pid_k,
                 tl.sum(dS * S_next, axis=0))
        carry = _carry(dA_cs_ptr, seq_idx_ptr, c, chunk_size, seqlen, s_sq_l, HAS_SEQ_IDX)
        dS = carry * dS + tl.load(dstate_out_ptr + base + c * s_st_c, mask=mask, other=0.0)
        S_next = tl.load(states_in_ptr + base + c * s_st_c, mask=mask, other=0.0).to(tl.float32)
    tl.store(dinit_ptr + fin, dS, mask=mask)


def state_passing_bwd(G, dfinal, final, states_in, dA_cs, seq_idx, chunk_size, seqlen):
    """G float32 [b, nchunks, h, p, n]: gradient the outputs of chunk c send to the state entering it.

    Returns dstates float32 [b, nchunks, h, p, n] (gradient of the state leaving each chunk),
    dinit float32 [b, h, p, n], dda_last float32 [b, h, nchunks] (gradient of each chunk's total
    log-decay).
    """
    batch, nchunks, nheads, headdim, dstate = G.shape
    dim = headdim * dstate
    block = min(1024, triton.next_power_of_2(dim))
    nblocks = triton.cdiv(dim, block)
    dstates = torch.empty_like(G)
    dinit = torch.empty(batch, nheads, headdim, dstate, device=G.device, dtype=torch.float32)
    dda_last = torch.empty(batch, nheads, nchunks, nblocks, device=G.device, dtype=torch.float32)
    sq = seq_idx if seq_idx is not None else dA_cs
    dfin = dfinal.contiguous() if dfinal is not None else dinit
    _state_passing_bwd_kernel[(batch * nheads, nblocks)](
        G, dfin, final, states_in, dA_cs, sq, dstates, dinit, dda_last,
        seqlen, nheads, dim, chunk_size, nchunks,
        G.stride(0), G.stride(1), G.stride(2),
        dA_cs.stride(0), dA_cs.stride(1),
        dinit.stride(0), dinit.stride(1),
        sq.stride(0), sq.stride(1),
        HAS_DFINAL=dfinal is not None, HAS_SEQ_IDX=seq_idx is not None, BLOCK=block,
        num_warps=4,
    )
    return dstates, dinit, dda_last.sum(-1)
