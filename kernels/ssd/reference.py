"""Mamba-2's state space duality (SSD) scan in plain PyTorch: the specification of kernels.ssd.

Per head h (scalar decay), with the state h_t of shape [headdim, d_state]:

    dt_t = clamp(softplus(dt_t + dt_bias), dt_limit)           (softplus only when dt_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T
    y_t  = h_t C_t + D * x_t ;   y_t *= silu(z_t)               (when z is given)

Shapes (mamba_ssm's layout): x [batch, seqlen, nheads, headdim]; dt [batch, seqlen, nheads];
A [nheads]; B, C [batch, seqlen, ngroups, d_state] (head h reads group h // (nheads / ngroups));
D [nheads] or [nheads, headdim]; z [batch, seqlen, nheads, headdim]; dt_bias [nheads];
initial_states [batch, nheads, headdim, d_state]; seq_idx int32 [batch, seqlen] (non-decreasing
document ids: the state restarts from zero at every document start; initial_states belong to the
document of the first token).

Math is in float32 (float64 when the inputs are float64, so tests and gradcheck can be exact).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_NO_LIMIT = (0.0, float("inf"))


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
                dt_limit: tuple[float, float], dtype: torch.dtype) -> torch.Tensor:
    """dt [..., nheads] -> the step sizes actually used, in `dtype`."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    # mamba_ssm clamps only when a limit is set: without softplus a negative raw dt stays as given
    if tuple(dt_limit) != _NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _heads_from_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """[..., ngroups, d_state] -> [..., nheads, d_state]: each group serves nheads // ngroups heads."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def _skip_and_gate(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """y += D x, then y *= silu(z); y, x, z [..., nheads, headdim]; D [nheads] or [nheads, headdim]."""
    if D is not None:
        Df = D.to(y.dtype)
        y = y + x.to(y.dtype) * (Df if Df.dim() == 2 else Df.unsqueeze(-1))
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def mamba_chunk_scan_combined_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                  C: torch.Tensor, chunk_size: int, D: torch.Tensor | None = None,
                                  z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                                  dt_softplus: bool = False, dt_limit: tuple[float, float] = _NO_LIMIT,
                                  initial_states: torch.Tensor | None = None,
                                  seq_idx: torch.Tensor | None = None, return_final_states: bool = False):
    """The chunked SSD algorithm (Dao & Gu 2024, section 6), differentiable by autograd.

    Returns y [batch, seqlen, nheads, headdim] in x's dtype, and with return_final_states also the
    state after the last token, [batch, nheads, headdim, d_state] in float32 (float64 for float64
    inputs). With seq_idx the final state is that of the last document.

    The sequence is cut into chunks of `chunk_size` (the last one padded with dt = 0, which neither
    decays nor writes the state). Within a chunk the output is a masked matmul (C B^T weighted by
    the decay between the two positions: the "attention-like" quadratic form); across chunks the
    state is carried by the linear recurrence over chunk states.
    """
    batch, seqlen, nheads, headdim = x.shape
    cdt = _compute_dtype(x, dt, A, B, C, initial_states)
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)              # [b, l, h]
    xf = x.to(cdt)
    Bh = _heads_from_groups(B.to(cdt), nheads)                              # [b, l, h, n]
    Ch = _heads_from_groups(C.to(cdt), nheads)
    d_state = Bh.shape[-1]

    # pad to whole chunks; padded tokens repeat the last document id so they change nothing
    nchunks = max(1, -(-seqlen // chunk_size))
    pad = nchunks * chunk_size - seqlen
    if pad:
        xf, dt, Bh, Ch = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xf, dt, Bh, Ch))
    if seq_idx is not None:
        sid = seq_idx.long()
        if pad:
            sid = torch.cat([sid, sid[:, -1:].expand(batch, pad)], dim=1)
        sid = sid.view(batch, nchunks, chunk_size)                          # [b, c, s]

    # [b, c, s, ...] chunked views
    xc = xf.view(batch, nchunks, chunk_size, nheads, headdim)
    dtc = dt.view(batch, nchunks, chunk_size, nheads)
    Bc = Bh.view(batch, nchunks, chunk_size, nheads, d_state)
    Cc = Ch.view(batch, nchunks, chunk_size, nheads, d_state)
    dA_cum = torch.cumsum(dtc * A.to(cdt), dim=2)                           # [b, c, s, h], log decay from chunk start

    # 1. intra-chunk (diagonal blocks): y_t = sum_{s <= t} C_t.B_s exp(cum_t - cum_s) dt_s x_s
    seg = dA_cum.unsqueeze(3) - dA_cum.unsqueeze(2)                         # [b, c, t, s, h]
    keep = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    keep = keep.view(1, 1, chunk_size, chunk_size, 1)
    if seq_idx is not None:
        keep = keep & (sid.unsqueeze(3) == sid.unsqueeze(2)).unsqueeze(-1)
    # mask before exp: above the diagonal cum_t - cum_s > 0 and could overflow
    decay = torch.exp(seg.masked_fill(~keep, float("-inf")))
    scores = torch.einsum("bcthn,bcshn->bctsh", Cc, Bc) * decay
    y = torch.einsum("bctsh,bcsh,bcshp->bcthp", scores, dtc, xc)

    # 2. state each chunk writes by its end, from its own tokens only (those of its last document)
    decay_to_end = torch.exp(dA_cum[:, :, -1:] - dA_cum)                    # [b, c, s, h]
    if seq_idx is not None:
        decay_to_end = decay_to_end * (sid == sid[:, :, -1:]).unsqueeze(-1)
    chunk_states = torch.einsum("bcsh,bcsh,bcshp,bcshn->bchpn", decay_to_end, dtc, xc, Bc)

    # 3. carry states across chunks; the carried state belongs to one document (that of the last
    # token before the chunk) and is dropped as soon as a chunk ends in a later document
    state = (initial_states.to(cdt) if initial_states is not None
             else xf.new_zeros(batch, nheads, headdim, d_state))
    state_doc = sid[:, 0, 0] if seq_idx is not None else None              # [b]
    chunk_decay = torch.exp(dA_cum[:, :, -1])                               # [b, c, h]
    entering = []
    for c in range(nchunks):
        entering.append(state)
        carry = chunk_decay[:, c, :, None, None]
        if seq_idx is not None:
            carry = carry * (sid[:, c, -1] == state_doc).to(cdt).view(batch, 1, 1, 1)
            state_doc = sid[:, c, -1]
        state = carry * state + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)                                 # [b, c, h, p, n]

    # 4. contribution of the entering state: y_t += exp(cum_t) C_t . state, same document only
    state_decay = torch.exp(dA_cum)                                         # [b, c, s, h]
    if seq_idx is not None:
        prev_doc = torch.cat([sid[:, :1, 0], sid[:, :-1, -1]], dim=1)       # [b, c]
        state_decay = state_decay * (sid == prev_doc.unsqueeze(-1)).unsqueeze(-1)
    y = y + torch.einsum("bcshn,bchpn,bcsh->bcshp", Cc, entering, state_decay)

    y = y.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    y = _skip_and_gate(y, x, D, z).to(x.dtype)
    return (y, state) if return_final_states else y


def ssd_naive(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              chunk_size: int | None = None, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
              dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
              dt_limit: tuple[float, float] = _NO_LIMIT, initial_states: torch.Tensor | None = None,
              seq_idx: torch.Tensor | None = None, return_final_states: bool = False):
    """The recurrence token by token in float64 (for tests); same arguments and returns as
    mamba_chunk_scan_combined_ref (chunk_size is ignored), final state in float64."""
    batch, seqlen, nheads, headdim = x.shape
    f64 = torch.float64
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, f64)
    Bh = _heads_from_groups(B.to(f64), nheads)
    Ch = _heads_from_groups(C.to(f64), nheads)
    xf, Af = x.to(f64), A.to(f64)
    state = (initial_states.to(f64).clone() if initial_states is not None
             else xf.new_zeros(batch, nheads, headdim, Bh.shape[-1]))
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1]).view(batch, 1, 1, 1)
            state = torch.where(new_doc, torch.zeros_like(state), state)
        dA = torch.exp(dt[:, t] * Af)                                       # [b, h]
        state = (dA[..., None, None] * state
                 + (dt[:, t, :, None] * xf[:, t]).unsqueeze(-1) * Bh[:, t].unsqueeze(-2))
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(batch, 0, nheads, headdim)
    y = _skip_and_gate(y, x, D, z).to(x.dtype)
    return (y, state) if return_final_states else y


def ssd_step_ref(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                 B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                 z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                 dt_softplus: bool = False, dt_limit: tuple[float, float] = _NO_LIMIT) -> torch.Tensor:
    """One decode step of the recurrence; updates `state` in place and returns y.

    state [batch, nheads, headdim, d_state] (float32 usually); x, z [batch, nheads, headdim];
    dt [batch, nheads]; A [nheads]; B, C [batch, ngroups, d_state]; D [nheads] or [nheads, headdim]
    -> y [batch, nheads, headdim] in x's dtype.
    """
    nheads = x.shape[1]
    cdt = _compute_dtype(state, x, dt, A, B, C)
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)               # [b, h]
    Bh = _heads_from_groups(B.to(cdt), nheads)                              # [b, h, n]
    Ch = _heads_from_groups(C.to(cdt), nheads)
    dA = torch.exp(dt * A.to(cdt))[..., None, None]
    new = dA * state.to(cdt) + (dt.unsqueeze(-1) * x.to(cdt)).unsqueeze(-1) * Bh.unsqueeze(-2)
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    return _skip_and_gate(y, x, D, z).to(x.dtype)
