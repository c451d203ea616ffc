"""Backward of stages 2, 4 and 5 within each chunk (the cross-chunk part is state_passing_bwd).

With W[t, s] = (dy[t] . x[s]) exp(dA_cs[t] - dA_cs[s]) dt[s] for s <= t in one chunk and document,
and dS the gradient of the state leaving the chunk (dstates), per head:

    dx[s]  = dt[s] (sum_{t >= s} CB[t, s] exp(dA_cs[t] - dA_cs[s]) dy[t] + exp(dA_cs[last] - dA_cs[s]) dS B[s]) + D dy[s]
    dB[s]  = sum_{t >= s} W[t, s] C[t] + exp(dA_cs[last] - dA_cs[s]) dt[s] dS^T x[s]         (summed over the group's heads)
    dC[t]  = sum_{s <= t} W[t, s] B[s] + exp(dA_cs[t]) S_c^T dy[t]                            (summed over the group's heads)
    ddt[s] = (dx[s] - D dy[s]) . x[s] / dt[s]          (computed without the division)
    d dA_cs[u] = sum_s (W * CB)[u, s] - sum_t (W * CB)[t, u]        (row sum minus column sum)
                 + exp(dA_cs[u]) (S_c^T dy[u]) . C[u]                 (entering state)
                 - dt[u] exp(dA_cs[last] - dA_cs[u]) x[u] . (dS B[u])  (leaving state)
    and the chunk's last position also gets <dS, S_{c+1}> (from state_passing_bwd).

No transposed tile of a tl.dot result feeds another tl.dot (a pattern Triton 3.4-3.7 miscompiles on
Hopper): the transposed operands are loaded transposed from memory instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import dot_precision, fast_launch

# launch parameters of the two in-chunk backward kernels (benchmarks/ssd.py sweeps them);
# num_warps None: 8 for [headdim, d_state] tiles of 128 x 128 and more, else 4
CONFIG = dict(block=64, num_warps=None, num_stages=1, min_programs=1024)


@fast_launch
@triton.jit
def _gate_bwd_kernel(dout_ptr, z_ptr, y_ptr, dy_ptr, dz_ptr, numel, BLOCK: tl.constexpr):
    """out = y * silu(z): dy = dout * silu(z), dz = dout * y * silu'(z)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    tl.store(dy_ptr + offs, (dout * z * sig).to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + offs, (dout * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mask)


def gate_bwd(dout, z, y):
    """Gradients through out = y * silu(z) (all [b, l, h, p], contiguous) -> (dy, dz)."""
    dy, dz = torch.empty_like(y), torch.empty_like(z)
    numel = y.numel()
    _gate_bwd_kernel[(triton.cdiv(numel, 1024),)](dout, z, y, dy, dz, numel, BLOCK=1024, num_warps=4)
    return dy, dz


@fast_launch
@triton.jit
def _bwd_dx_kernel(
    x_ptr, dy_ptr, B_ptr, C_ptr, CB_ptr, dt_ptr, dA_cs_ptr, dstates_ptr, D_ptr, seq_idx_ptr,
    dx_ptr, dB_ptr, ddt_ptr, dda_ptr, dD_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks, heads_per_prog,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_cb_b, s_cb_c, s_cb_g, s_cb_t, s_cb_s,
    s_dt_b, s_dt_h, s_dt_c,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_D_h,
    s_sq_b, s_sq_l,
    s_dB_split, s_dB_b, s_dB_l, s_dB_g, s_dB_n,
    s_dD_b, s_dD_k, s_dD_h,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, ATOMIC: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: a block of positions s of one chunk, for heads_per_prog heads of one group
    (accumulating the group's dB over them). dtype of the dots: the inputs'."""
    nsplit = (nheads // ngroups) // heads_per_prog
    pid = tl.program_id(0)
    pid_split = pid % nsplit
    pid_g = (pid // nsplit) % ngroups
    pid_c = (pid // (nsplit * ngroups)) % nchunks
    pid_b = pid // (nsplit * ngroups * nchunks)
    pid_s = tl.program_id(1)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    s_in = offs_s < chunk_len
    p_in = offs_p < headdim
    n_in = offs_n < dstate

    B_ptr += pid_b * s_B_b + chunk_start * s_B_l + pid_g * s_B_g
    C_ptr += pid_b * s_B_b + chunk_start * s_B_l + pid_g * s_B_g
    CB_ptr += pid_b * s_cb_b + pid_c * s_cb_c + pid_g * s_cb_g
    b_s = tl.load(B_ptr + offs_s[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                  mask=s_in[:, None] & n_in[None, :], other=0.0)
    if HAS_SEQ_IDX:
        seq_idx_ptr += pid_b * s_sq_b + chunk_start * s_sq_l
        doc_s = tl.load(seq_idx_ptr + offs_s * s_sq_l, mask=s_in, other=-1)
        doc_last = tl.load(seq_idx_ptr + (chunk_len - 1) * s_sq_l)
    dB_acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    xy_offs = offs_s[:, None] * s_x_l + offs_p[None, :] * s_x_p
    xy_mask = s_in[:, None] & p_in[None, :]
    hi = chunk_len
    for i in range(heads_per_prog):
        pid_h = pid_g * (nheads // ngroups) + pid_split * heads_per_prog + i
        head_x = pid_b * s_x_b + chunk_start * s_x_l + pid_h * s_x_h
        head_dt = pid_b * s_dt_b + pid_h * s_dt_h + pid_c * s_dt_c
        x_s = tl.load(x_ptr + head_x + xy_offs, mask=xy_mask, other=0.0)
        dA_s = tl.load(dA_cs_ptr + head_dt + offs_s, mask=s_in, other=0.0)
        dt_s = tl.load(dt_ptr + head_dt + offs_s, mask=s_in, other=0.0)
        dA_last = tl.load(dA_cs_ptr + head_dt + chunk_len - 1)

        # the leaving state's gradient dS [p, n] seen from position s
        st = dstates_ptr + pid_b * s_st_b + pid_c * s_st_c + pid_h * s_st_h
        dS_t32 = tl.load(st + offs_n[:, None] * s_st_n + offs_p[None, :] * s_st_p,
                         mask=n_in[:, None] & p_in[None, :], other=0.0)                    # [n, p]
        dS_t = dS_t32.to(x_s.dtype)
        dS = tl.load(st + offs_p[:, None] * s_st_p + offs_n[None, :] * s_st_n,
                     mask=p_in[:, None] & n_in[None, :], other=0.0).to(x_s.dtype)         # [p, n]
        to_end = tl.exp(dA_last - dA_s)
        if HAS_SEQ_IDX:
            to_end = tl.where(doc_s == doc_last, to_end, 0.0)
        to_end = tl.where(s_in, to_end, 0.0)
        acc_state = tl.dot(b_s, dS_t, input_precision=DOT_PRECISION)
        if SPLIT:
            # dS's bf16 rounding remainder as a second dot: the decay gradient below subtracts this
            # term from <dS, S> of similar size, so it needs ~fp32 accuracy
            acc_state += tl.dot(b_s, (dS_t32 - dS_t.to(tl.float32)).to(x_s.dtype),
                                input_precision=DOT_PRECISION)
        acc_state = acc_state * to_end[:, None]                                           # [s, p]
        state_term = tl.sum(acc_state * x_s.to(tl.float32), axis=1)
        dB_acc += tl.dot(x_s, dS, input_precision=DOT_PRECISION) * (to_end * dt_s)[:, None]

        # in-chunk part: acc feeds dx only; ddt's in-chunk part is summed from exact fp32 products
        acc = tl.zeros((BLOCK_S, BLOCK_P), dtype=tl.float32)
        ddt_intra = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for t0 in range(pid_s * BLOCK_S, hi, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_in = offs_t < chunk_len
            keep = (offs_t[None, :] >= offs_s[:, None]) & s_in[:, None] & t_in[None, :]    # [s, t]
            if HAS_SEQ_IDX:
                doc_t = tl.load(seq_idx_ptr + offs_t * s_sq_l, mask=t_in, other=-2)
                keep &= doc_s[:, None] == doc_t[None, :]
            dA_t = tl.load(dA_cs_ptr + head_dt + offs_t, mask=t_in, other=0.0)
            decay = tl.exp(tl.where(keep, dA_t[None, :] - dA_s[:, None], float("-inf")))
            cb_t = tl.load(CB_ptr + offs_t[None, :] * s_cb_t + offs_s[:, None] * s_cb_s,
                           mask=keep, other=0.0)                                         # CB[t, s] as [s, t]
            m_t = tl.where(keep, cb_t * decay, 0.0)
            dy_t = tl.load(dy_ptr + head_x + offs_t[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                           mask=t_in[:, None] & p_in[None, :], other=0.0)                # [t, p]
            acc += tl.dot(m_t.to(dy_t.dtype), dy_t, input_precision=DOT_PRECISION)
            dyT = tl.load(dy_ptr + head_x + offs_p[:, None] * s_x_p + offs_t[None, :] * s_x_l,
                          mask=p_in[:, None] & t_in[None, :], other=0.0)                 # [p, t]
            # W[t, s] / dt[s] as [s, t]
            u_t = tl.where(keep, tl.dot(x_s, dyT, input_precision=DOT_PRECISION) * decay, 0.0)
            ddt_intra += tl.sum(u_t * cb_t, axis=1)
            c_t = tl.load(C_ptr + offs_t[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                          mask=t_in[:, None] & n_in[None, :], other=0.0)
            dB_acc += tl.dot((u_t * dt_s[:, None]).to(c_t.dtype), c_t, input_precision=DOT_PRECISION)
        colsum = ddt_intra * dt_s

        dy_s = tl.load(dy_ptr + head_x + xy_offs, mask=xy_mask, other=0.0).to(tl.float32)
        xf = x_s.to(tl.float32)
        dx = (acc + acc_state) * dt_s[:, None]
        if HAS_D:
            if D_PER_CHANNEL:
                d = tl.load(D_ptr + pid_h * s_D_h + offs_p, mask=p_in, other=0.0).to(tl.float32)[None, :]
            else:
                d = tl.load(D_ptr + pid_h * s_D_h).to(tl.float32)
            dx += d * dy_s
            dD = tl.sum(dy_s * xf, axis=0)
            tl.store(dD_ptr + pid_b * s_dD_b + (pid_c * tl.num_programs(1) + pid_s) * s_dD_k
                     + pid_h * s_dD_h + offs_p, dD, mask=p_in)
        tl.store(dx_ptr + head_x + xy_offs, dx.to(dx_ptr.dtype.element_ty), mask=xy_mask)
        tl.store(ddt_ptr + head_dt + offs_s, ddt_intra + state_term, mask=offs_s < chunk_size)
        tl.store(dda_ptr + head_dt + offs_s, -colsum - dt_s * state_term, mask=offs_s < chunk_size)

    dB_out = (dB_ptr + pid_b * s_dB_b + (chunk_start + offs_s[:, None]) * s_dB_l + pid_g * s_dB_g
              + offs_n[None, :] * s_dB_n)
    if ATOMIC:
        tl.atomic_add(dB_out, dB_acc, mask=s_in[:, None] & n_in[None, :])
    else:
        tl.store(dB_out + pid_split * s_dB_split, dB_acc, mask=s_in[:, None] & n_in[None, :])


@fast_launch
@triton.jit
def _bwd_dc_kernel(
    x_ptr, dy_ptr, B_ptr, C_ptr, CB_ptr, dt_ptr, dA_cs_ptr, states_in_ptr, seq_idx_ptr,
    dC_ptr, dda_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks, heads_per_prog,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_cb_b, s_cb_c, s_cb_g, s_cb_t, s_cb_s,
    s_dt_b, s_dt_h, s_dt_c,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_sq_b, s_sq_l,
    s_dC_split, s_dC_b, s_dC_l, s_dC_g, s_dC_n,
    HAS_SEQ_IDX: tl.constexpr, ATOMIC: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: a block of positions t of one chunk, for heads_per_prog heads of one group:
    dC (summed over those heads) and the row-sum / entering-state parts of d dA_cs (added to what
    _bwd_dx_kernel stored)."""
    nsplit = (nheads // ngroups) // heads_per_prog
    pid = tl.program_id(0)
    pid_split = pid % nsplit
    pid_g = (pid // nsplit) % ngroups
    pid_c = (pid // (nsplit * ngroups)) % nchunks
    pid_b = pid // (nsplit * ngroups * nchunks)
    pid_t = tl.program_id(1)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t_in = offs_t < chunk_len
    p_in = offs_p < headdim
    n_in = offs_n < dstate

    B_ptr += pid_b * s_B_b + chunk_start * s_B_l + pid_g * s_B_g
    C_ptr += pid_b * s_B_b + chunk_start * s_B_l + pid_g * s_B_g
    CB_ptr += pid_b * s_cb_b + pid_c * s_cb_c + pid_g * s_cb_g
    c_t = tl.load(C_ptr + offs_t[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                  mask=t_in[:, None] & n_in[None, :], other=0.0).to(tl.float32)
    if HAS_SEQ_IDX:
        seq_idx_ptr += pid_b * s_sq_b + chunk_start * s_sq_l
        doc_t = tl.load(seq_idx_ptr + offs_t * s_sq_l, mask=t_in, other=-1)
        doc_prev = tl.load(seq_idx_ptr - s_sq_l * tl.minimum(pid_c, 1))
    dC_acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    hi = tl.minimum((pid_t + 1) * BLOCK_T, chunk_len)
    for i in range(heads_per_prog):
        pid_h = pid_g * (nheads // ngroups) + pid_split * heads_per_prog + i
        head_x = pid_b * s_x_b + chunk_start * s_x_l + pid_h * s_x_h
        head_dt = pid_b * s_dt_b + pid_h * s_dt_h + pid_c * s_dt_c
        dy_t = tl.load(dy_ptr + head_x + offs_t[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                       mask=t_in[:, None] & p_in[None, :], other=0.0)                      # [t, p]
        dA_t = tl.load(dA_cs_ptr + head_dt + offs_t, mask=t_in, other=0.0)

        # the entering state: y[t] += exp(dA_cs[t]) C[t] . S_c
        st = states_in_ptr + pid_b * s_st_b + pid_c * s_st_c + pid_h * s_st_h
        S32 = tl.load(st + offs_p[:, None] * s_st_p + offs_n[None, :] * s_st_n,
                      mask=p_in[:, None] & n_in[None, :], other=0.0).to(tl.float32)          # [p, n]
        S = S32.to(dy_t.dtype)
        from_start = tl.exp(dA_t)
        if HAS_SEQ_IDX:
            from_start = tl.where(doc_t == doc_prev, from_start, 0.0)
        from_start = tl.where(t_in, from_start, 0.0)
        acc = tl.dot(dy_t, S, input_precision=DOT_PRECISION)
        if SPLIT:  # S's rounding remainder: the decay gradient needs this term to ~fp32 accuracy
            acc += tl.dot(dy_t, (S32 - S.to(tl.float32)).to(dy_t.dtype), input_precision=DOT_PRECISION)
        acc = acc * from_start[:, None]                                                    # [t, n]
        dda = tl.sum(acc * c_t, axis=1)

        rowsum = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for s0 in range(0, hi, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_in = offs_s < chunk_len
            keep = (offs_t[:, None] >= offs_s[None, :]) & t_in[:, None] & s_in[None, :]
            if HAS_SEQ_IDX:
                doc_s = tl.load(seq_idx_ptr + offs_s * s_sq_l, mask=s_in, other=-2)
                keep &= doc_t[:, None] == doc_s[None, :]
            dA_s = tl.load(dA_cs_ptr + head_dt + offs_s, mask=s_in, other=0.0)
            dt_s = tl.load(dt_ptr + head_dt + offs_s, mask=s_in, other=0.0)
            decay = tl.exp(tl.where(keep, dA_t[:, None] - dA_s[None, :], float("-inf")))
            xT = tl.load(x_ptr + head_x + offs_p[:, None] * s_x_p + offs_s[None, :] * s_x_l,
                         mask=p_in[:, None] & s_in[None, :], other=0.0)                      # [p, s]
            w = tl.where(keep, tl.dot(dy_t, xT, input_precision=DOT_PRECISION) * decay, 0.0) * dt_s[None, :]  # W[t, s]
            b_s = tl.load(B_ptr + offs_s[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                          mask=s_in[:, None] & n_in[None, :], other=0.0)
            acc += tl.dot(w.to(b_s.dtype), b_s, input_precision=DOT_PRECISION)
            cb = tl.load(CB_ptr + offs_t[:, None] * s_cb_t + offs_s[None, :] * s_cb_s, mask=keep, other=0.0)
            rowsum += tl.sum(tl.where(keep, w * cb, 0.0), axis=1)
        dC_acc += acc
        # add to the column-sum part that _bwd_dx_kernel stored for this head
        prev = tl.load(dda_ptr + head_dt + offs_t, mask=offs_t < chunk_size, other=0.0)
        tl.store(dda_ptr + head_dt + offs_t, prev + rowsum + dda, mask=offs_t < chunk_size)

    dC_out = (dC_ptr + pid_b * s_dC_b + (chunk_start + offs_t[:, None]) * s_dC_l + pid_g * s_dC_g
              + offs_n[None, :] * s_dC_n)
    if ATOMIC:
        tl.atomic_add(dC_out, dC_acc, mask=t_in[:, None] & n_in[None, :])
    else:
        tl.store(dC_out + pid_split * s_dC_split, dC_acc, mask=t_in[:, None] & n_in[None, :])


def _heads_per_prog(batch, nchunks, nheads, ngroups, nblocks, min_programs):
    """Heads each program loops over: all heads of a group would need no partial dB/dC buffers,
    but leave too few programs to fill the GPU; split the group until there are enough."""
    per_group = nheads // ngroups
    hpp = per_group
    while hpp > 1 and batch * nchunks * ngroups * (per_group // hpp) * nblocks < min_programs:
        hpp //= 2
        while per_group % hpp:
            hpp -= 1
    return hpp


def chunk_scan_bwd(x, dy, B, C, CB, dt_out, dA_cs, states_in, dstates, D, seq_idx, chunk_size,
                   deterministic):
    """Gradients of the in-chunk terms; see the module docstring.

    Returns dx (x's dtype), dB, dC (float32 [b, l, g, n]), ddt_part, dda (float32
    [b, h, nchunks, chunk_size]: gradients w.r.t. dt_out and dA_cs, except the chunk totals' term),
    dD (float32, D's shape) or None.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    nchunks = dt_out.shape[2]
    cfg = CONFIG
    block = max(16, min(cfg["block"], triton.next_power_of_2(chunk_size)))
    nblocks = triton.cdiv(chunk_size, block)
    hpp = _heads_per_prog(batch, nchunks, nheads, ngroups, nblocks, cfg["min_programs"])
    nsplit = (nheads // ngroups) // hpp
    atomic = not deterministic and nsplit > 1
    parts = 1 if atomic else nsplit
    alloc = torch.zeros if atomic else torch.empty
    dB = alloc(parts, batch, seqlen, ngroups, dstate, device=x.device, dtype=torch.float32)
    dC = alloc(parts, batch, seqlen, ngroups, dstate, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    ddt_part = torch.empty_like(dt_out)
    dda = torch.empty_like(dt_out)
    dD = (torch.empty(batch, nchunks * nblocks, nheads, headdim, device=x.device, dtype=torch.float32)
          if D is not None else None)
    sq = seq_idx if seq_idx is not None else dt_out
    block_p = max(16, triton.next_power_of_2(headdim))
    block_n = max(16, triton.next_power_of_2(dstate))
    grid = (batch * nchunks * ngroups * nsplit, nblocks)
    common = (seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks, hpp,
              *x.stride(), *B.stride(), *CB.stride(),
              dt_out.stride(0), dt_out.stride(1), dt_out.stride(2), *states_in.stride())
    warps = cfg["num_warps"] or (8 if block_p * block_n >= 128 * 128 else 4)
    dDp = dD if dD is not None else dx
    precision = dot_precision(x.dtype)
    _bwd_dx_kernel[grid](
        x, dy, B, C, CB, dt_out, dA_cs, dstates, D if D is not None else x, sq,
        dx, dB, ddt_part, dda, dDp,
        *common, D.stride(0) if D is not None else 0, sq.stride(0), sq.stride(1),
        *dB.stride(), dDp.stride(0), dDp.stride(1), dDp.stride(2),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
        HAS_SEQ_IDX=seq_idx is not None, ATOMIC=atomic, SPLIT=x.dtype != torch.float32,
        BLOCK_S=block, BLOCK_T=block, BLOCK_P=block_p, BLOCK_N=block_n, DOT_PRECISION=precision,
        num_warps=warps, num_stages=cfg["num_stages"],
    )
    _bwd_dc_kernel[grid](
        x, dy, B, C, CB, dt_out, dA_cs, states_in, sq, dC, dda,
        *common, sq.stride(0), sq.stride(1), *dC.stride(),
        HAS_SEQ_IDX=seq_idx is not None, ATOMIC=atomic, SPLIT=x.dtype != torch.float32,
        BLOCK_T=block, BLOCK_S=block, BLOCK_P=block_p, BLOCK_N=block_n, DOT_PRECISION=precision,
        num_warps=warps, num_stages=cfg["num_stages"],
    )
    if dD is not None:  # one reduction launch each: small shapes feel every launch
        dD = dD.sum((0, 1, 3) if D.dim() == 1 else (0, 1))
    if parts == 1:
        return dx, dB[0], dC[0], ddt_part, dda, dD
    return dx, dB.sum(0), dC.sum(0), ddt_part, dda, dD
