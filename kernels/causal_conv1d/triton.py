"""Causal depthwise conv1d (+ silu) in Triton: forward and backward, with seq_idx and a carried state.

Computes exactly reference.causal_conv1d_ref:

    y[b, t, c] = act( bias[c] + sum_{k<w} weight[c, k] * x[b, t - (w-1) + k, c] )

x at negative times comes from conv_state (the previous w-1 inputs), and with seq_idx a tap that
reaches into another document reads zero. Layout: x, y [batch, seqlen, dim] (any strides);
weight [dim, width]; bias [dim]; conv_state [batch, dim, width-1], read, then overwritten in place
with the last width-1 inputs; seq_idx int32 [batch, seqlen].

Forward: one program per (batch, 64 positions, 64 channels) tile reads x once per tap (the taps
overlap in cache) and writes y. Backward: the same tiling; the gradient at position j gathers the
w outputs that read j, recomputing their pre-activations instead of storing them, and weight/bias
gradients are written as per-tile partial sums that are added in a fixed order (deterministic).
Gradients flow to x, weight and bias; conv_state is an input of inference (no gradient).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

BLOCK_L = 64
BLOCK_D = 64


def available() -> bool:
    """Triton imports and can run: a CUDA GPU, or the CPU under TRITON_INTERPRET=1."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    @triton.jit
    def _tap(x_ptr, state_ptr, seq_ptr, b, t, offs_d, mask_d, k, seqlen, sid_t, sid_first,
             s_x_b, s_x_l, s_x_d, s_st_b, s_st_d, s_st_k, s_seq_b,
             W: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr):
        """x at positions j = t - (W-1) + k as a [len(t), len(offs_d)] float32 tile (state for j < 0,
        zero across a document boundary or outside [0, seqlen))."""
        j = t - (W - 1) + k
        in_seq = (t < seqlen) & (t >= 0)
        m = (in_seq & (j >= 0))[:, None] & mask_d[None, :]
        v = tl.load(x_ptr + b * s_x_b + j[:, None] * s_x_l + offs_d[None, :] * s_x_d, mask=m, other=0.0).to(tl.float32)
        if HAS_STATE:
            ms = (in_seq & (j < 0))[:, None] & mask_d[None, :]
            sv = tl.load(state_ptr + b * s_st_b + offs_d[None, :] * s_st_d + (j + W - 1)[:, None] * s_st_k,
                         mask=ms, other=0.0).to(tl.float32)
            v = tl.where((j < 0)[:, None], sv, v)
        if HAS_SEQ:
            sid_j = tl.load(seq_ptr + b * s_seq_b + j, mask=in_seq & (j >= 0), other=0)
            sid_j = tl.where(j < 0, sid_first, sid_j)
            v = tl.where((sid_j == sid_t)[:, None], v, 0.0)
        return v

    @triton.jit
    def _pre_activation(x_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, b, t, offs_d, mask_d, seqlen,
                        s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_st_b, s_st_d, s_st_k, s_seq_b,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr):
        """bias + sum_k w_k x_{t-(W-1)+k} at positions t: [len(t), len(offs_d)] float32."""
        in_seq = (t < seqlen) & (t >= 0)
        sid_t = tl.zeros_like(t)
        sid_first = 0
        if HAS_SEQ:
            sid_t = tl.load(seq_ptr + b * s_seq_b + t, mask=in_seq, other=0)
            sid_first = tl.load(seq_ptr + b * s_seq_b)
        acc = tl.zeros((t.shape[0], offs_d.shape[0]), dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        for k in tl.static_range(W):
            wk = tl.load(w_ptr + offs_d * s_w_d + k * s_w_k, mask=mask_d, other=0.0).to(tl.float32)
            acc += _tap(x_ptr, state_ptr, seq_ptr, b, t, offs_d, mask_d, k, seqlen, sid_t, sid_first,
                        s_x_b, s_x_l, s_x_d, s_st_b, s_st_d, s_st_k, s_seq_b, W, HAS_STATE, HAS_SEQ) * wk[None, :]
        return acc

    @triton.jit
    def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, y_ptr, seqlen, dim,
                         s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_st_b, s_st_d, s_st_k, s_seq_b, s_y_b, s_y_l, s_y_d,
                         W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr,
                         SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        acc = _pre_activation(x_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, b, t, offs_d, mask_d, seqlen,
                              s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_st_b, s_st_d, s_st_k, s_seq_b,
                              W, HAS_BIAS, HAS_STATE, HAS_SEQ)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        m = (t < seqlen)[:, None] & mask_d[None, :]
        tl.store(y_ptr + b * s_y_b + t[:, None] * s_y_l + offs_d[None, :] * s_y_d,
                 acc.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, seqlen, dim,
                         s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_st_b, s_st_d, s_st_k, s_seq_b,
                         s_dy_b, s_dy_l, s_dy_d, s_dx_b, s_dx_l, s_dx_d,
                         W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr,
                         SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        tile = tl.program_id(1)
        j = tile * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        sid_j = tl.zeros_like(j)
        sid_first = 0
        if HAS_SEQ:
            sid_j = tl.load(seq_ptr + b * s_seq_b + j, mask=j < seqlen, other=0)
            sid_first = tl.load(seq_ptr + b * s_seq_b)
        dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for s in tl.static_range(W):
            # outputs t = j + s read x_j through tap k = W-1-s
            t = j + s
            in_seq = t < seqlen
            m = in_seq[:, None] & mask_d[None, :]
            g = tl.load(dy_ptr + b * s_dy_b + t[:, None] * s_dy_l + offs_d[None, :] * s_dy_d, mask=m,
                        other=0.0).to(tl.float32)
            if SILU:
                pre = _pre_activation(x_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, b, t, offs_d, mask_d, seqlen,
                                      s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_st_b, s_st_d, s_st_k, s_seq_b,
                                      W, HAS_BIAS, HAS_STATE, HAS_SEQ)
                sig = tl.sigmoid(pre)
                g = g * sig * (1.0 + pre * (1.0 - sig))
            same = in_seq
            if HAS_SEQ:
                sid_t = tl.load(seq_ptr + b * s_seq_b + t, mask=in_seq, other=0)
                same = same & (sid_t == sid_j)
            wk = tl.load(w_ptr + offs_d * s_w_d + (W - 1 - s) * s_w_k, mask=mask_d, other=0.0).to(tl.float32)
            dx += tl.where(same[:, None], g, 0.0) * wk[None, :]
            if s == 0:
                # t = j: this tile's outputs give the weight and bias gradients
                sid_t0 = sid_j
                for k in tl.static_range(W):
                    xk = _tap(x_ptr, state_ptr, seq_ptr, b, j, offs_d, mask_d, k, seqlen, sid_t0, sid_first,
                              s_x_b, s_x_l, s_x_d, s_st_b, s_st_d, s_st_k, s_seq_b, W, HAS_STATE, HAS_SEQ)
                    part = tl.sum(g * xk, axis=0)
                    tl.store(dw_ptr + ((b * tl.num_programs(1) + tile) * dim + offs_d) * W + k, part, mask=mask_d)
                if HAS_BIAS:
                    tl.store(db_ptr + (b * tl.num_programs(1) + tile) * dim + offs_d, tl.sum(g, axis=0), mask=mask_d)
        m = (j < seqlen)[:, None] & mask_d[None, :]
        tl.store(dx_ptr + b * s_dx_b + j[:, None] * s_dx_l + offs_d[None, :] * s_dx_d,
                 dx.to(dx_ptr.dtype.element_ty), mask=m)


def _strides_state(conv_state):
    return (conv_state.stride(0), conv_state.stride(1), conv_state.stride(2)) if conv_state is not None else (0, 0, 0)


def _launch_args(x, weight, bias, conv_state, seq_idx):
    dummy = x
    return dict(
        pointers=(x, weight, bias if bias is not None else dummy, conv_state if conv_state is not None else dummy,
                  seq_idx if seq_idx is not None else dummy),
        strides=(x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), *_strides_state(conv_state),
                 seq_idx.stride(0) if seq_idx is not None else 0),
        flags=dict(W=weight.shape[1], HAS_BIAS=bias is not None, HAS_STATE=conv_state is not None,
                   HAS_SEQ=seq_idx is not None))


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv_state, seq_idx, silu):
        batch, seqlen, dim = x.shape
        y = torch.empty(batch, seqlen, dim, device=x.device, dtype=x.dtype)
        a = _launch_args(x, weight, bias, conv_state, seq_idx)
        grid = (batch, triton.cdiv(seqlen, BLOCK_L), triton.cdiv(dim, BLOCK_D))
        _conv_fwd_kernel[grid](*a["pointers"], y, seqlen, dim, *a["strides"], y.stride(0), y.stride(1), y.stride(2),
                               SILU=silu, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, **a["flags"], num_warps=4)
        ctx.save_for_backward(x, weight, bias, conv_state, seq_idx)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, conv_state, seq_idx = ctx.saved_tensors
        batch, seqlen, dim = x.shape
        width = weight.shape[1]
        tiles = triton.cdiv(seqlen, BLOCK_L)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dw = torch.empty(batch, tiles, dim, width, device=x.device, dtype=torch.float32)
        db = torch.empty(batch, tiles, dim, device=x.device, dtype=torch.float32)
        a = _launch_args(x, weight, bias, conv_state, seq_idx)
        grid = (batch, tiles, triton.cdiv(dim, BLOCK_D))
        _conv_bwd_kernel[grid](*a["pointers"], dy, dx, dw, db, seqlen, dim, *a["strides"],
                               dy.stride(0), dy.stride(1), dy.stride(2), dx.stride(0), dx.stride(1), dx.stride(2),
                               SILU=ctx.silu, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, **a["flags"], num_warps=4)
        dweight = dw.sum(dim=(0, 1)).to(weight.dtype)
        dbias = db.sum(dim=(0, 1)).to(bias.dtype) if bias is not None else None
        return dx, dweight, dbias, None, None, None


def _next_state(x, conv_state, seq_idx):
    """The last width-1 inputs after x (zeros for positions of a finished document), [b, dim, w-1]."""
    keep = conv_state.shape[2]
    seqlen = x.shape[1]
    if seqlen >= keep:
        tail = x[:, seqlen - keep:].float()
        sid_tail = None if seq_idx is None else seq_idx[:, seqlen - keep:]
    else:
        tail = torch.cat([conv_state.float().transpose(1, 2)[:, seqlen:], x.float()], dim=1)
        sid_tail = None if seq_idx is None else torch.cat(
            [seq_idx[:, :1].expand(-1, keep - seqlen), seq_idx], dim=1)
    if seq_idx is not None:
        tail = tail * (sid_tail == seq_idx[:, -1:]).unsqueeze(-1)
    return tail.transpose(1, 2)


def causal_conv1d_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        activation: str | None = None, conv_state: torch.Tensor | None = None,
                        seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton causal conv1d; arguments and effect as reference.causal_conv1d_ref (checked by
    interface.causal_conv1d). Differentiable in x, weight and bias."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d activation={activation!r}: use None or 'silu'")
    sid = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    state_in = None
    if conv_state is not None and conv_state.shape[2] > 0:
        state_in = conv_state.detach().clone() if torch.is_grad_enabled() else conv_state
    y = _CausalConv1dFn.apply(x, weight, bias, state_in, sid, activation is not None)
    if conv_state is not None and conv_state.shape[2] > 0:
        with torch.no_grad():
            conv_state.copy_(_next_state(x, conv_state, sid).to(conv_state.dtype))
    return y
