"""Stage 5: the outputs.

y[t] = sum_{s <= t, same chunk, same document} CB[t, s] exp(dA_cs[t] - dA_cs[s]) dt[s] x[s]
       + exp(dA_cs[t]) C[t] . S_c   (when t is in the document S_c belongs to)
       + D x[t];            out = y * silu(z)   (when z is given; y is then kept for the backward)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# launch parameters (benchmarks/ssd.py sweeps them); block_p/block_n are capped by headdim/d_state
CONFIG = dict(block_t=64, block_p=64, block_n=128, num_warps=4, num_stages=2)


@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, z_ptr, C_ptr, CB_ptr, dt_ptr, dA_cs_ptr, states_in_ptr, D_ptr, seq_idx_ptr,
    out_ptr, y_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_cb_b, s_cb_c, s_cb_g, s_cb_t, s_cb_s,
    s_dt_b, s_dt_h, s_dt_c,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_D_h,
    s_sq_b, s_sq_l,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bch = tl.program_id(0)
    pid_h = pid_bch % nheads
    pid_c = (pid_bch // nheads) % nchunks
    pid_b = pid_bch // (nheads * nchunks)
    pid_g = pid_h // (nheads // ngroups)
    pid_t, pid_p = tl.program_id(1), tl.program_id(2)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    t_in = offs_t < chunk_len
    p_in = offs_p < headdim

    x_ptr += pid_b * s_x_b + chunk_start * s_x_l + pid_h * s_x_h
    C_ptr += pid_b * s_C_b + chunk_start * s_C_l + pid_g * s_C_g
    CB_ptr += pid_b * s_cb_b + pid_c * s_cb_c + pid_g * s_cb_g
    dt_ptr += pid_b * s_dt_b + pid_h * s_dt_h + pid_c * s_dt_c
    dA_cs_ptr += pid_b * s_dt_b + pid_h * s_dt_h + pid_c * s_dt_c
    states_in_ptr += pid_b * s_st_b + pid_c * s_st_c + pid_h * s_st_h
    dA_t = tl.load(dA_cs_ptr + offs_t, mask=t_in, other=0.0)
    if HAS_SEQ_IDX:
        seq_idx_ptr += pid_b * s_sq_b + chunk_start * s_sq_l
        doc_t = tl.load(seq_idx_ptr + offs_t * s_sq_l, mask=t_in, other=-1)
        doc_prev = tl.load(seq_idx_ptr - s_sq_l * tl.minimum(pid_c, 1))

    # the state entering the chunk, seen through C and decayed to each position
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        c = tl.load(C_ptr + offs_t[:, None] * s_C_l + offs_n[None, :] * s_C_n,
                    mask=t_in[:, None] & (offs_n[None, :] < dstate), other=0.0)
        st = tl.load(states_in_ptr + offs_n[:, None] * s_st_n + offs_p[None, :] * s_st_p,
                     mask=(offs_n[:, None] < dstate) & p_in[None, :], other=0.0)
        acc += tl.dot(c, st.to(c.dtype))
    state_scale = tl.exp(dA_t)
    if HAS_SEQ_IDX:
        state_scale = tl.where(doc_t == doc_prev, state_scale, 0.0)
    acc = acc * state_scale[:, None]

    # within the chunk: the causal, decay-weighted C B^T applied to dt x
    hi = tl.minimum((pid_t + 1) * BLOCK_T, chunk_len)
    for s0 in range(0, hi, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_in = offs_s < chunk_len
        cb = tl.load(CB_ptr + offs_t[:, None] * s_cb_t + offs_s[None, :] * s_cb_s,
                     mask=t_in[:, None] & s_in[None, :], other=0.0)
        dA_s = tl.load(dA_cs_ptr + offs_s, mask=s_in, other=0.0)
        dt_s = tl.load(dt_ptr + offs_s, mask=s_in, other=0.0)
        keep = (offs_t[:, None] >= offs_s[None, :]) & t_in[:, None] & s_in[None, :]
        if HAS_SEQ_IDX:
            doc_s = tl.load(seq_idx_ptr + offs_s * s_sq_l, mask=s_in, other=-2)
            keep &= doc_t[:, None] == doc_s[None, :]
        # mask before exp: above the diagonal the exponent is positive and could overflow
        decay = tl.exp(tl.where(keep, dA_t[:, None] - dA_s[None, :], float("-inf")))
        w = tl.where(keep, cb * decay * dt_s[None, :], 0.0)
        xs = tl.load(x_ptr + offs_s[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                     mask=s_in[:, None] & p_in[None, :], other=0.0)
        acc += tl.dot(w.to(xs.dtype), xs)

    io_mask = t_in[:, None] & p_in[None, :]
    if HAS_D:
        xt = tl.load(x_ptr + offs_t[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=io_mask, other=0.0)
        if D_PER_CHANNEL:
            d = tl.load(D_ptr + pid_h * s_D_h + offs_p, mask=p_in, other=0.0).to(tl.float32)[None, :]
        else:
            d = tl.load(D_ptr + pid_h * s_D_h).to(tl.float32)
        acc += xt.to(tl.float32) * d
    io = pid_b * s_x_b + (chunk_start + offs_t[:, None]) * s_x_l + pid_h * s_x_h + offs_p[None, :] * s_x_p
    if HAS_Z:
        tl.store(y_ptr + io, acc.to(y_ptr.dtype.element_ty), mask=io_mask)
        z = tl.load(z_ptr + io, mask=io_mask, other=0.0).to(tl.float32)
        acc = acc * z * tl.sigmoid(z)
    tl.store(out_ptr + io, acc.to(out_ptr.dtype.element_ty), mask=io_mask)


def chunk_scan_fwd(x, z, C, CB, dt_out, dA_cs, states_in, D, seq_idx, chunk_size):
    """x, z [b, l, h, p]; C [b, l, g, n]; CB from bmm_chunk; dt_out, dA_cs [b, h, nchunks, chunk_size];
    states_in [b, nchunks, h, p, n]; D [h] or [h, p] -> (out [b, l, h, p], y before the gate or None)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = C.shape[2:]
    nchunks = dt_out.shape[2]
    out = torch.empty_like(x)
    y = torch.empty_like(x) if z is not None else None
    cfg = CONFIG
    block_t = max(16, min(cfg["block_t"], triton.next_power_of_2(chunk_size)))
    block_p = max(16, min(cfg["block_p"], triton.next_power_of_2(headdim)))
    block_n = max(16, min(cfg["block_n"], triton.next_power_of_2(dstate)))
    grid = (batch * nchunks * nheads, triton.cdiv(chunk_size, block_t), triton.cdiv(headdim, block_p))
    sq = seq_idx if seq_idx is not None else dt_out
    _chunk_scan_fwd_kernel[grid](
        x, z if z is not None else x, C, CB, dt_out, dA_cs, states_in, D if D is not None else x, sq,
        out, y if y is not None else out,
        seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks,
        *x.stride(), *C.stride(), *CB.stride(),
        dt_out.stride(0), dt_out.stride(1), dt_out.stride(2),
        *states_in.stride(),
        D.stride(0) if D is not None else 0,
        sq.stride(0), sq.stride(1),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_T=block_t, BLOCK_S=block_t, BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, y
