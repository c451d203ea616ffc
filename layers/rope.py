"""Rotary position embedding (Su et al., 2021, "RoFormer"), full or partial, NeoX / Hugging Face layout.

Convention: of each head's head_dim channels the first rotary_dim are rotated, the rest pass through
(partial rotary, as in GPT-NeoX, Zamba2-style and Phi models). The rotated channels are split in two
halves, and channel i is paired with channel i + rotary_dim / 2 ("rotate_half"), not with its
neighbour 2i+1 as in GPT-J and Meta's original Llama code. Pair i turns by angle
position * theta^(-2i / rotary_dim).
"""
from __future__ import annotations

import torch


def rotary_dim_for(head_dim: int, rope_fraction: float) -> int:
    """Number of rotated channels per head: head_dim * rope_fraction, which must be a positive even integer."""
    if not 0.0 < rope_fraction <= 1.0:
        raise ValueError(f"rope_fraction={rope_fraction} must be in (0, 1]: the share of each head's "
                         f"channels that RoPE rotates")
    rotary_dim = round(head_dim * rope_fraction)
    if abs(rotary_dim - head_dim * rope_fraction) > 1e-6 or rotary_dim % 2 or rotary_dim == 0:
        raise ValueError(f"rope_fraction={rope_fraction} x head_dim={head_dim} = {head_dim * rope_fraction} "
                         f"must be a positive even integer (channels are rotated in pairs): pick "
                         f"rope_fraction so that head_dim * rope_fraction is even")
    return rotary_dim


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotation angles, fp32, shape [seqlen, rotary_dim] (each angle twice: halves layout).

    positions: [seqlen] absolute token positions (integers).
    """
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float64) / rotary_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [seqlen, rotary_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    # Angles in float64 keep positions in the 10^5-10^6 range exact before the cast.
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of every head.

    x: [batch, seqlen, nheads, head_dim]; cos, sin: [seqlen, rotary_dim] -> [batch, seqlen, nheads, head_dim]
    """
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    out = (rot * cos + rotated * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
