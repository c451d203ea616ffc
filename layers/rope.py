"""Rotary position embedding (Su et al., 2021, "RoFormer"), full or partial, NeoX / Hugging Face layout.

Convention: of each head's head_dim channels the first rotary_dim are rotated, the rest pass through
(partial rotary, as in GPT-NeoX, Zamba2-style and Phi models). The rotated channels are split in two
halves, and channel i is paired with channel i + rotary_dim / 2 ("rotate_half"), not with its
neighbour 2i+1 as in GPT-J and Meta's original Llama code. Pair i turns by angle
position * theta^(-2i / rotary_dim).
"""
from __future__ import annotations

import os

import torch

from kernels.backend import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the PyTorch version serves every call
    triton = None


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


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of every head, in fp32 (the PyTorch specification).

    x: [batch, seqlen, nheads, head_dim]; cos, sin: [seqlen, rotary_dim / 2] -> [batch, seqlen, nheads, head_dim]
    """
    half = cos.shape[-1]
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([out, x[..., 2 * half:]], dim=-1) if x.shape[-1] > 2 * half else out


if triton is not None:
    @triton.jit
    def _rope_kernel(X, OUT, COS, SIN, n_rows, seqlen, nheads, head_dim, half,
                     BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
        """One tile of BLOCK_ROWS (token, head) rows: out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin in
        fp32; the backward rotates by the opposite angle. Rows are [batch, seqlen, nheads] flattened."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_HALF)
        mask = (rows < n_rows)[:, None] & (cols < half)[None, :]
        pos = (rows // nheads) % seqlen
        cos = tl.load(COS + pos[:, None] * half + cols[None, :], mask=mask, other=0.0)
        sin = tl.load(SIN + pos[:, None] * half + cols[None, :], mask=mask, other=0.0)
        if BACKWARD:
            sin = -sin
        offs = rows[:, None].to(tl.int64) * head_dim + cols[None, :]
        x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + offs + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + offs + half, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


def _rope_triton(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor, backward: bool) -> torch.Tensor:
    """x: contiguous [batch, seqlen, nheads, head_dim]; cos_half, sin_half: contiguous fp32 [seqlen, rotary_dim/2]."""
    batch, seqlen, nheads, head_dim = x.shape
    half = cos_half.shape[-1]
    out = torch.empty_like(x)
    if 2 * half < head_dim:
        out[..., 2 * half:] = x[..., 2 * half:]  # channels RoPE leaves alone
    n_rows = batch * seqlen * nheads
    block_half = triton.next_power_of_2(half)
    block_rows = max(1, 2048 // block_half)
    _rope_kernel[(triton.cdiv(n_rows, block_rows),)](x, out, cos_half, sin_half, n_rows, seqlen, nheads, head_dim,
                                                     half, BLOCK_ROWS=block_rows, BLOCK_HALF=block_half,
                                                     BACKWARD=backward)
    return out


if triton is not None:
    # A custom op (opaque to torch.compile, with a fake implementation for tracing) rather than a bare
    # autograd.Function, so compiled models keep the kernel.
    @torch.library.custom_op("hybrid_zoo::rope_rotate", mutates_args=())
    def _rope_op(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor, backward: bool) -> torch.Tensor:
        return _rope_triton(x.contiguous(), cos_half, sin_half, backward)

    @_rope_op.register_fake
    def _(x, cos_half, sin_half, backward):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _rope_setup_context(ctx, inputs, output):
        _, cos_half, sin_half, backward = inputs
        ctx.save_for_backward(cos_half, sin_half)
        ctx.backward = backward

    def _rope_backward(ctx, grad_out):
        cos_half, sin_half = ctx.saved_tensors
        # A rotation's transpose is the rotation by the opposite angle.
        return _rope_op(grad_out, cos_half, sin_half, not ctx.backward), None, None, None

    _rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def _use_triton(x: torch.Tensor) -> bool:
    if triton is None or resolve_backend() == "reference":
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of every head (fp32 math, output in x's dtype).

    x: [batch, seqlen, nheads, head_dim]; cos, sin: [seqlen, rotary_dim / 2] from rope_cos_sin or
    RopeTable -> [batch, seqlen, nheads, head_dim]. On CUDA one fused Triton kernel (forward and
    backward; the PyTorch version takes 5-6 passes over x); HYBRID_ZOO_KERNELS=reference forces
    apply_rope_ref.
    """
    if _use_triton(x):
        return _rope_op(x, cos.contiguous(), sin.contiguous(), False)
    return apply_rope_ref(x, cos, sin)
