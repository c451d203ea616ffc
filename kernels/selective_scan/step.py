"""One decode step of Mamba-1's selective scan, fused in one Triton kernel (the state update).

    dt    = softplus(dt + dt_bias)                       (softplus only when dt_softplus)
    state = exp(dt A) * state + dt B x                   (in place, float32)
    out   = (sum_n C state + D x) * silu(z)

Shapes: state [batch, dim, dstate] (float32, updated in place); x, dt, z [batch, dim]; A [dim, dstate];
B, C [batch, groups, dstate] or [batch, dstate]; D, dt_bias [dim]. Returns out [batch, dim] in x's dtype.
This is what `selective_scan_fn(..., initial_state=state, return_last_state=True)` computes for a
single token, without its launch and layout overheads: one program per (batch, block of channels)
reads each input once and writes the state once.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux; the reference still works
    triton = None


def available(device: torch.device | str | None = None) -> bool:
    """The Triton kernel can run: Triton imports and there is a GPU (or TRITON_INTERPRET=1)."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The specification in plain PyTorch (float32 math); same arguments and effect as
    selective_state_update."""
    Bg = B.unsqueeze(1) if B.dim() == 2 else B
    Cg = C.unsqueeze(1) if C.dim() == 2 else C
    per_group = x.shape[1] // Bg.shape[1]
    Bd = Bg.float().repeat_interleave(per_group, dim=1)                     # [b, dim, n]
    Cd = Cg.float().repeat_interleave(per_group, dim=1)
    dtf = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    if dt_softplus:
        dtf = F.softplus(dtf)
    xf = x.float()
    new = torch.exp(dtf.unsqueeze(-1) * A.float()) * state.float() + (dtf * xf).unsqueeze(-1) * Bd
    state.copy_(new)
    y = (new * Cd).sum(-1)
    if D is not None:
        y = y + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


if triton is not None:
    @triton.jit
    def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
                             dim, dstate, dim_per_group,
                             s_state_b, s_state_d, s_x_b, s_x_d, s_dt_b, s_dt_d, s_A_d,
                             s_B_b, s_B_g, s_C_b, s_C_g, s_z_b, s_z_d, s_out_b, s_out_d,
                             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                             SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask = mask_d[:, None] & (offs_n[None, :] < dstate)
        group = offs_d // dim_per_group
        x = tl.load(x_ptr + b * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + b * s_dt_b + offs_d * s_dt_d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if SOFTPLUS:
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + b * s_B_b + group[:, None] * s_B_g + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + b * s_C_b + group[:, None] * s_C_g + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        state_ptrs = state_ptr + b * s_state_b + offs_d[:, None] * s_state_d + offs_n[None, :]
        h = tl.load(state_ptrs, mask=mask, other=0.0)
        h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv
        tl.store(state_ptrs, h, mask=mask)
        y = tl.sum(h * Cv, axis=1)
        if HAS_D:
            y += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + b * s_z_b + offs_d * s_z_d, mask=mask_d, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(out_ptr + b * s_out_b + offs_d * s_out_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                           z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                           dt_softplus: bool = False) -> torch.Tensor:
    """One token: updates `state` [batch, dim, dstate] (float32) in place and returns out [batch, dim].
    Uses the Triton kernel when it can run on these tensors, else selective_state_update_ref.
    Inference only (no autograd)."""
    batch, dim = x.shape
    dstate = A.shape[1]
    Bg = B.unsqueeze(1) if B.dim() == 2 else B
    Cg = C.unsqueeze(1) if C.dim() == 2 else C
    if state.shape != (batch, dim, dstate):
        raise ValueError(f"selective_state_update: state must be [batch={batch}, dim={dim}, dstate={dstate}], "
                         f"got {tuple(state.shape)}")
    if dt.shape != x.shape or (z is not None and z.shape != x.shape):
        raise ValueError(f"selective_state_update: dt and z must be [batch, dim] = {tuple(x.shape)}")
    if Bg.shape != Cg.shape or Bg.shape[0] != batch or Bg.shape[2] != dstate or dim % Bg.shape[1]:
        raise ValueError(f"selective_state_update: B and C must be [batch={batch}, groups, dstate={dstate}] "
                         f"with groups dividing dim={dim}, got {tuple(B.shape)} and {tuple(C.shape)}")
    usable = (available() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
              and state.dtype == torch.float32 and state.stride(-1) == 1)
    if not usable:
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    A = A.contiguous() if A.stride(-1) != 1 else A
    Bg = Bg if Bg.stride(-1) == 1 else Bg.contiguous()
    Cg = Cg if Cg.stride(-1) == 1 else Cg.contiguous()
    out = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    block_n = triton.next_power_of_2(dstate)
    block_d = max(1, min(triton.next_power_of_2(dim), 4096 // block_n))
    grid = (batch, triton.cdiv(dim, block_d))
    dummy = x
    _state_update_kernel[grid](
        state, x, dt, A, Bg, Cg, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, out,
        dim, dstate, dim // Bg.shape[1],
        state.stride(0), state.stride(1), x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), A.stride(0),
        Bg.stride(0), Bg.stride(1), Cg.stride(0), Cg.stride(1),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0, out.stride(0), out.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4)
    return out
