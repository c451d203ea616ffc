"""Rotary position embedding (Su et al., 2021, "RoFormer"), full or partial, NeoX / Hugging Face layout.

Convention: of each head's head_dim channels the first rotary_dim are rotated, the rest pass through
(partial rotary, as in GPT-NeoX, Zamba2-style and Phi models). The rotated channels are split in two
halves, and channel i is paired with channel i + rotary_dim / 2 ("rotate_half"), not with its
neighbour 2i+1 as in GPT-J and Meta's original Llama code. Pair i turns by angle
position * theta^(-2i / rotary_dim).
"""
from __future__ import annotations

import torch

from kernels.rope import apply_rope, apply_rope_ref  # noqa: F401  (re-exported: the op lives in kernels/)


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
    """cos, sin of the rotation angles, fp32, shape [seqlen, rotary_dim / 2] (angle of pair i in column i).

    positions: [seqlen] absolute token positions (integers).
    """
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float64) / rotary_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [seqlen, rotary_dim / 2]
    # Angles in float64 keep positions in the 10^5-10^6 range exact before the cast.
    return angles.cos().float(), angles.sin().float()


class RopeTable:
    """cos/sin for positions 0 .. end-1, computed once per device and grown by doubling, so a forward
    (and every decoding step) only slices rows instead of recomputing angles."""

    def __init__(self, rotary_dim: int, theta: float):
        self.rotary_dim, self.theta = rotary_dim, theta
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [end - start, rotary_dim / 2] fp32 for positions start .. end-1 (contiguous views)."""
        cos, sin = self._tables.get(device, (None, None))
        if cos is None or cos.shape[0] < end:
            size = max(end, 2 * (cos.shape[0] if cos is not None else 0), 256)
            cos, sin = rope_cos_sin(torch.arange(size, device=device), self.rotary_dim, self.theta)
            self._tables[device] = (cos, sin)
        return cos[start:end], sin[start:end]
