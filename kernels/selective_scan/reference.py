"""Mamba-1's selective scan in plain PyTorch: the specification of kernels.selective_scan.

Per channel d and state index n (diagonal, real A), with the state h of shape [batch, dim, dstate]:

    dt_t = softplus(delta_t + delta_bias)                      (softplus only when delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = sum_n C_t h_t + D * u_t ;   out_t = y_t * silu(z_t)  (when z is given)

Shapes (mamba_ssm's layout): u, delta, z [batch, dim, seqlen]; A [dim, dstate];
B, C [batch, groups, dstate, seqlen] (channel d reads group d // (dim / groups)) or
[batch, dstate, seqlen] (one group); D, delta_bias [dim]; initial_state [batch, dim, dstate];
seq_idx int32 [batch, seqlen] (document ids: the state restarts from zero at the first token of
every new document; initial_state belongs to the document of the first token).

Math is in float32 (float64 when an input is float64, so tests and gradcheck can be exact).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_groups(t: torch.Tensor) -> torch.Tensor:
    """B or C as [batch, groups, dstate, seqlen] (a 3-D [batch, dstate, seqlen] is one group)."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _prepare_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool,
                   dtype: torch.dtype) -> torch.Tensor:
    """delta [batch, dim, seqlen] -> the step sizes dt actually used, in `dtype`."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype).unsqueeze(-1)
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def _skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None,
                   z: torch.Tensor | None) -> torch.Tensor:
    """y += D u, then y *= silu(z); y, u, z [batch, dim, seqlen]; D [dim]."""
    if D is not None:
        y = y + D.to(y.dtype).unsqueeze(-1) * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _default_chunk_size(seqlen: int, device: torch.device) -> int:
    """The power of two nearest sqrt(seqlen) (the scan below runs chunk_size + seqlen / chunk_size
    Python steps, fewest at sqrt(seqlen)), at most 64 on CUDA and 16 elsewhere: on CPU the steps
    within a chunk read strided slabs, and chunks of 32-64 measured slower (docs/layers-mamba.md)."""
    cap = 64 if device.type == "cuda" else 16
    return min(cap, 1 << max(0, round(math.log2(max(seqlen, 1)) / 2)))


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False, initial_state: torch.Tensor | None = None,
                       seq_idx: torch.Tensor | None = None, chunk_size: int | None = None):
    """The chunked selective scan, differentiable by autograd (also through initial_state and the
    returned last state).

    Returns out [batch, dim, seqlen] in u's dtype, and with return_last_state also the state after
    the last token, [batch, dim, dstate] in float32 (float64 for float64 inputs). With seq_idx the
    last state is that of the last document.

    chunk_size: tokens per chunk (default: the power of two nearest sqrt(seqlen), at most 16 on CPU
    and 64 on CUDA).

    The algorithm, a two-level scan: the sequence is cut into `nchunks` chunks of `chunk_size`
    tokens (the last one padded with dt = 0, which neither decays nor writes the state).
      1. Local states: every chunk is scanned from a zero state, all chunks at once, by a loop over
         the chunk_size positions within a chunk (tensors [nchunks, batch, dim, dstate] per step).
      2. Carried states: a loop over the chunks carries the state entering each chunk,
         S_{c+1} = exp(sum of dt A over chunk c) S_c + (local state at the end of chunk c).
      3. Every position adds the carried state decayed to it, exp(cum_t) S_c, where cum_t is the
         cumulative sum of dt A from the chunk start (log space, cum_t <= 0: exp never overflows).
    So the Python loop runs chunk_size + nchunks steps instead of seqlen, and memory stays a small
    multiple of the states [batch, dim, dstate, seqlen]. Why not the quadratic "segment sum" form
    of SSD within a chunk: with a decay per (channel, state index) its decay matrix is
    [batch, dim, dstate, chunk, chunk], chunk_size times the states; measured on 2 CPU threads
    (batch 16, dim 128, dstate 16, seqlen 128, forward+backward) it took 640 ms at chunk 8 and
    1410 ms at chunk 16 against 160-230 ms for this scan (docs/layers-mamba.md has the table).
    """
    batch, dim, seqlen = u.shape
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, cdt)          # [b, d, l]
    Bg, Cg = _as_groups(B).to(cdt), _as_groups(C).to(cdt)                # [b, g, n, l]
    groups, dstate = Bg.shape[1], Bg.shape[2]
    per_group = dim // groups
    if seqlen == 1:
        return _one_step(u, dt, A, Bg, Cg, D, z, initial_state, return_last_state)
    chunk = chunk_size or _default_chunk_size(seqlen, u.device)
    nchunks = -(-seqlen // chunk)
    pad = nchunks * chunk - seqlen

    # Time-major layout [l, b, g, p, n] (dim = groups * per_group, p indexes channels in a group):
    # a step of the loops below reads whole [b, g, p, n] blocks, contiguous in memory.
    def time_major(t: torch.Tensor) -> torch.Tensor:        # [b, d, l] -> [l, b, g, p, 1]
        return t.permute(2, 0, 1).reshape(seqlen, batch, groups, per_group, 1)

    dtf = time_major(dt)
    dtu = dtf * time_major(u.to(cdt))                                    # dt_t u_t
    Bt = Bg.permute(3, 0, 1, 2).unsqueeze(3)                             # [l, b, g, 1, n]
    if pad:
        # dt = 0 on padding: decay exp(0) = 1 and no input, so the state passes through unchanged
        dtf, dtu, Bt = (F.pad(t, (0, 0) * 4 + (0, pad)) for t in (dtf, dtu, Bt))
    state_shape = (batch, groups, per_group, dstate)
    Ag = A.to(cdt).view(groups, per_group, dstate)
    dtf = dtf.view(nchunks, chunk, batch, groups, per_group, 1)
    dA = dtf * Ag                                                        # [c, T, b, g, p, n], <= 0 for A <= 0
    x = (dtu * Bt).view(nchunks, chunk, *state_shape)                    # dt_t B_t u_t
    decay = dA.exp()
    if seq_idx is not None:
        sid = seq_idx.t().long()                                         # [l, b]
        # a new document starts where the id changes: no decay from before it reaches it
        starts = torch.cat([torch.zeros_like(sid[:1], dtype=torch.bool), sid[1:] != sid[:-1]])
        starts = F.pad(starts, (0, 0, 0, pad)).view(nchunks, chunk, batch, 1, 1, 1)
        decay = decay.masked_fill(starts, 0.0)

    # 1. local states of every chunk from a zero state, all chunks in parallel. (unbind, not
    # indexing in the loop: each indexed slice's backward would fill a zero tensor of full size.)
    decay_k, x_k = decay.unbind(1), x.unbind(1)
    local = [x_k[0]]
    for k in range(1, chunk):
        local.append(torch.addcmul(x_k[k], decay_k[k], local[-1]))
    chunk_local = local[-1].unbind(0)                                    # c x [b, g, p, n]
    local = torch.stack(local, dim=1)                                    # [c, T, b, g, p, n]

    # 3's decay from the chunk start (before token 0 of the chunk) to each position, log space
    # (A is constant in time, so cum = A * cumsum(dt): a cumulative sum dstate times smaller)
    cum_dt = dtf.cumsum(dim=1)                                           # [c, T, b, g, p, 1]
    cum = cum_dt * Ag
    chunk_decay = cum_dt[:, -1] * Ag                                     # [c, b, g, p, n]: whole chunk
    if seq_idx is not None:
        # a document start inside the chunk at or before t cuts the carried state off
        cut = starts.cumsum(dim=1) > 0
        cum = cum.masked_fill(cut, float("-inf"))
        chunk_decay = chunk_decay.masked_fill(cut[:, -1], float("-inf"))
    carried_decay = cum.exp()

    # 2. states entering each chunk
    entering = [initial_state.to(cdt).view(state_shape) if initial_state is not None
                else x.new_zeros(state_shape)]
    chunk_decay = chunk_decay.exp().unbind(0)
    for c in range(nchunks - 1):
        entering.append(torch.addcmul(chunk_local[c], chunk_decay[c], entering[-1]))
    # the state after the last (padded) chunk is the state after token seqlen - 1
    last_state = torch.addcmul(chunk_local[-1], chunk_decay[-1], entering[-1]) if return_last_state else None
    entering = torch.stack(entering)                                     # [c, b, g, p, n]

    states = torch.addcmul(local, carried_decay, entering.unsqueeze(1))  # [c, T, b, g, p, n]
    states = states.view(nchunks * chunk, *state_shape)
    Ct = Cg.permute(3, 0, 1, 2).unsqueeze(-1)                            # [l, b, g, n, 1]
    y = torch.matmul(states[:seqlen], Ct)                                # [l, b, g, p, 1]: sum over n
    y = y.reshape(seqlen, batch, dim).permute(1, 2, 0)                   # [b, d, l]
    out = _skip_and_gate(y, u, D, z).to(u.dtype)
    if not return_last_state:
        return out
    return out, last_state.reshape(batch, dim, dstate)


def _one_step(u, dt, A, Bg, Cg, D, z, initial_state, return_last_state):
    """selective_scan_ref for seqlen == 1 (decoding): the recurrence once, in a third of the
    chunked scan's operations. dt [b, d, 1] already prepared; Bg, Cg [b, g, n, 1] in the compute dtype."""
    batch, dim, _ = u.shape
    groups, dstate = Bg.shape[1], Bg.shape[2]
    shape = (batch, groups, dim // groups, 1)
    dt1 = dt.view(shape)
    h = dt1 * u.to(dt.dtype).view(shape) * Bg.view(batch, groups, 1, dstate)   # [b, g, p, n]
    if initial_state is not None:
        decay = torch.exp(dt1 * A.to(dt.dtype).view(groups, dim // groups, dstate))
        h = torch.addcmul(h, decay, initial_state.to(dt.dtype).view(h.shape))
    y = torch.matmul(h, Cg).view(batch, dim, 1)                          # C . h
    out = _skip_and_gate(y, u, D, z).to(u.dtype)
    return (out, h.reshape(batch, dim, dstate)) if return_last_state else out


def selective_scan_naive(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                         delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                         return_last_state: bool = False, initial_state: torch.Tensor | None = None,
                         seq_idx: torch.Tensor | None = None, chunk_size: int | None = None):
    """The recurrence token by token, exactly as written in the module docstring (for tests; slow).
    Same arguments and results as selective_scan_ref; chunk_size is accepted and ignored."""
    batch, dim, seqlen = u.shape
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, cdt)
    Bg, Cg = _as_groups(B).to(cdt), _as_groups(C).to(cdt)
    channels_per_group = dim // Bg.shape[1]
    Bd = Bg.repeat_interleave(channels_per_group, dim=1)                 # [b, d, n, l]
    Cd = Cg.repeat_interleave(channels_per_group, dim=1)
    Af, uf = A.to(cdt), u.to(cdt)
    h = (initial_state.to(cdt) if initial_state is not None
         else uf.new_zeros(batch, dim, A.shape[1]))
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            same_doc = (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt).view(batch, 1, 1)
            h = h * same_doc
        h = torch.exp(dt[:, :, t, None] * Af) * h + (dt[:, :, t] * uf[:, :, t]).unsqueeze(-1) * Bd[..., t]
        ys.append((h * Cd[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(batch, dim, 0)
    out = _skip_and_gate(y, u, D, z).to(u.dtype)
    return (out, h) if return_last_state else out
