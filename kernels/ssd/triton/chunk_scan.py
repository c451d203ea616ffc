"""Stage 5: the outputs.

y[t] = sum_{s <= t, same chunk, same document} CB[t, s] exp(dA_cs[t] - dA_cs[s]) dt[s] x[s]
       + exp(dA_cs[t]) C[t] . S_c   (when t is in the document S_c belongs to)
       + D x[t];            out = y * silu(z)   (when z is given; y is then kept for the backward)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import dot_precision, fast_launch

# launch parameters (benchmarks/ssd.py sweeps them); block_p/block_n are capped by headdim/d_state.
# block_t: output rows per program; block_s: source positions per step of the in-chunk loop.
# fuse_cb: recompute C B^T inside (no bmm launch, no CB in memory) instead of reading bmm's output.
CONFIG = dict(block_t=64, block_s=64, block_p=64, block_n=128, num_warps=4, num_stages=2, fuse_cb=False)


@fast_launch
@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, z_ptr, C_ptr, B_ptr, CB_ptr, dt_ptr, dA_cs_ptr, states_in_ptr, D_ptr, seq_idx_ptr,
    out_ptr, y_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks, n_tblocks, n_pblocks,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_cb_b, s_cb_c, s_cb_g, s_cb_t, s_cb_s,
    s_dt_b, s_dt_h, s_dt_c,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_D_h,
    s_sq_b, s_sq_l,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    FUSE_CB: tl.constexpr, BLOCK_NF: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # one flat grid, row blocks fastest: the programs of one (batch, chunk, head) run side by side,
    # so its x rows and entering state can be reused from L2 (v2 made the row block the slowest
    # grid axis: each re-read was ~2048 programs later); heads next, so a group's CB stays in L2.
    # The last row block (the longest causal loop) starts first.
    pid = tl.program_id(0)
    pid_t = n_tblocks - 1 - pid % n_tblocks
    pid_p = (pid // n_tblocks) % n_pblocks
    pid_bch = pid // (n_tblocks * n_pblocks)
    pid_h = pid_bch % nheads
    pid_c = (pid_bch // nheads) % nchunks
    pid_b = pid_bch // (nheads * nchunks)
    pid_g = pid_h // (nheads // ngroups)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    t_in = offs_t < chunk_len
    p_in = offs_p < headdim

    x_ptr += pid_b * s_x_b + chunk_start * s_x_l + pid_h * s_x_h
    C_ptr += pid_b * s_C_b + chunk_start * s_C_l + pid_g * s_C_g
    B_ptr += pid_b * s_C_b + chunk_start * s_C_l + pid_g * s_C_g
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
        acc += tl.dot(c, st.to(c.dtype), input_precision=DOT_PRECISION)
    state_scale = tl.exp(dA_t)
    if HAS_SEQ_IDX:
        state_scale = tl.where(doc_t == doc_prev, state_scale, 0.0)
    acc = acc * state_scale[:, None]

    # within the chunk: the causal, decay-weighted C B^T applied to dt x
    if FUSE_CB:  # C B^T recomputed here from the block's C rows (whole d_state) and B^T tiles
        offs_nf = tl.arange(0, BLOCK_NF)
        c_rows = tl.load(C_ptr + offs_t[:, None] * s_C_l + offs_nf[None, :] * s_C_n,
                         mask=t_in[:, None] & (offs_nf[None, :] < dstate), other=0.0)
    hi = tl.minimum((pid_t + 1) * BLOCK_T, chunk_len)
    for s0 in range(0, hi, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_in = offs_s < chunk_len
        if FUSE_CB:
            bt = tl.load(B_ptr + offs_nf[:, None] * s_C_n + offs_s[None, :] * s_C_l,
                         mask=(offs_nf[:, None] < dstate) & s_in[None, :], other=0.0)
            cb = tl.dot(c_rows, bt, input_precision=DOT_PRECISION)
        else:
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
        acc += tl.dot(w.to(xs.dtype), xs, input_precision=DOT_PRECISION)

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


def chunk_scan_fwd(x, z, C, B, CB, dt_out, dA_cs, states_in, D, seq_idx, chunk_size):
    """x, z [b, l, h, p]; C, B [b, l, g, n] (same strides); CB from bmm_chunk, or None to recompute
    it inside (CONFIG["fuse_cb"] decides; CB given is used); dt_out, dA_cs [b, h, nchunks,
    chunk_size]; states_in [b, nchunks, h, p, n]; D [h] or [h, p]
    -> (out [b, l, h, p], y before the gate or None)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = C.shape[2:]
    nchunks = dt_out.shape[2]
    assert B.stride() == C.stride(), "B and C must share strides"
    out = torch.empty_like(x)
    y = torch.empty_like(x) if z is not None else None
    cfg = CONFIG
    fuse_cb = CB is None
    block_t = max(16, min(cfg["block_t"], triton.next_power_of_2(chunk_size)))
    block_p = max(16, min(cfg["block_p"], triton.next_power_of_2(headdim)))
    block_n = max(16, min(cfg["block_n"], triton.next_power_of_2(dstate)))
    block_s = max(16, min(cfg["block_s"], triton.next_power_of_2(chunk_size)))
    n_tblocks, n_pblocks = triton.cdiv(chunk_size, block_t), triton.cdiv(headdim, block_p)
    grid = (batch * nchunks * nheads * n_tblocks * n_pblocks,)
    sq = seq_idx if seq_idx is not None else dt_out
    cb = CB if CB is not None else dt_out  # placeholder pointer when fused
    cb_strides = CB.stride() if CB is not None else (0,) * 5
    _chunk_scan_fwd_kernel[grid](
        x, z if z is not None else x, C, B, cb, dt_out, dA_cs, states_in, D if D is not None else x, sq,
        out, y if y is not None else out,
        seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks, n_tblocks, n_pblocks,
        *x.stride(), *C.stride(), *cb_strides,
        dt_out.stride(0), dt_out.stride(1), dt_out.stride(2),
        *states_in.stride(),
        D.stride(0) if D is not None else 0,
        sq.stride(0), sq.stride(1),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_SEQ_IDX=seq_idx is not None, FUSE_CB=fuse_cb, BLOCK_NF=max(16, triton.next_power_of_2(dstate)),
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_P=block_p, BLOCK_N=block_n, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, y
