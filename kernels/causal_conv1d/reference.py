"""Causal depthwise conv1d (the short convolution in front of Mamba's scan), in plain PyTorch.

    y[b, t, c] = act( bias[c] + sum_{k=0}^{w-1} weight[c, k] * x[b, t - (w - 1) + k, c] )

where x at negative times comes from `conv_state` (the previous w-1 inputs; zeros without a state),
and with `seq_idx` every tap that reaches into another document reads zero.

Shapes: x [batch, seqlen, dim] (channel-last); weight [dim, width]; bias [dim];
conv_state [batch, dim, width - 1]; seq_idx int32 [batch, seqlen].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = None, conv_state: torch.Tensor | None = None,
                      seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Returns y [batch, seqlen, dim] in x's dtype; if conv_state is given it is read as the
    preceding inputs and then overwritten in place with the last width-1 inputs (the state after
    x), so consecutive calls equal one call on the concatenation. With seq_idx, the carried state
    belongs to the document of the first token, and state positions from a finished document are
    stored as zeros."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    cd = torch.promote_types(x.dtype, torch.float32)       # fp32 math; float64 stays float64
    xf, wf = x.to(cd), weight.to(cd)
    prev = (conv_state.to(cd).transpose(1, 2) if conv_state is not None
            else xf.new_zeros(batch, width - 1, dim))
    xpad = torch.cat([prev, xf], dim=1)                                   # [b, w-1+l, dim]
    if seq_idx is None:
        # width shifted multiply-adds on the channel-last layout: on a CPU at Mamba's widths (2-4
        # taps) this is several times faster than F.conv1d(groups=dim), whose backward dominated
        # a small Mamba-2 layer's step
        y = xpad[:, 0:seqlen] * wf[:, 0]
        for k in range(1, width):
            y = y + xpad[:, k:k + seqlen] * wf[:, k]
    else:
        windows = xpad.unfold(1, width, 1)                                # [b, l, dim, w]
        sid = seq_idx.long()
        sid_pad = torch.cat([sid[:, :1].expand(batch, width - 1), sid], dim=1)
        same_doc = sid_pad.unfold(1, width, 1) == sid.unsqueeze(-1)       # [b, l, w]
        y = torch.einsum("bldw,dw->bld", windows * same_doc.unsqueeze(2), wf)
    if bias is not None:
        y = y + bias.to(cd)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"causal_conv1d activation={activation!r}: use None or 'silu'")
    if conv_state is not None:
        tail = xpad[:, -(width - 1):] if width > 1 else xpad[:, :0]
        if seq_idx is not None and width > 1:
            # keep only inputs of the last document: the next call continues that document
            sid_tail = sid_pad[:, -(width - 1):]
            tail = tail * (sid_tail == sid[:, -1:]).unsqueeze(-1)
        conv_state.copy_(tail.transpose(1, 2).to(conv_state.dtype))
    return y.to(x.dtype)
