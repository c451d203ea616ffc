"""Rotary position embedding, the PyTorch specification (NeoX / Hugging Face "rotate_half" layout).

Of each head's channels the first rotary_dim are rotated, channel i paired with i + rotary_dim / 2:
    out1 = x1 cos - x2 sin,  out2 = x2 cos + x1 sin   (fp32 math), the rest pass through.
"""
from __future__ import annotations

import torch


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of every head, in fp32 (the PyTorch specification).

    x: [batch, seqlen, nheads, head_dim]; cos, sin: [seqlen, rotary_dim / 2] -> [batch, seqlen, nheads, head_dim]
    """
    half = cos.shape[-1]
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([out, x[..., 2 * half:]], dim=-1) if x.shape[-1] > 2 * half else out
