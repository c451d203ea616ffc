"""The fused rotary-embedding kernel (forward and backward: a rotation's transpose is the rotation by
the opposite angle), registered as the custom op hybrid_zoo::rope_rotate so torch.compile keeps it."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: interface.py serves every call with the reference
    triton = None


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
