"""Mamba-2's SSD scan on the Triton kernels of kernels/ssd/triton, forward and backward, as
torch.library custom ops (with fake implementations, so torch.compile traces through them).

Same signature and semantics as kernels.ssd.reference.mamba_chunk_scan_combined_ref; the interface
(kernels/ssd/interface.py) sends CUDA inputs here when `available()`.

Deterministic mode: the backward sums dB and dC over the heads of a group. By default programs that
share a group add their parts with float atomics (order-dependent rounding); with
`deterministic=True` or HYBRID_ZOO_DETERMINISTIC=1 each writes its own slice of a partial buffer and
the slices are summed in a fixed order: bitwise reproducible, at the cost of that buffer.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton  # noqa: F401
    _HAVE_TRITON = True
except ImportError:  # CPU installs without Triton: the interface falls back to the reference
    _HAVE_TRITON = False

if _HAVE_TRITON:
    # modules, not functions: their kernels are looked up at call time (tests on the CPU reload them
    # under TRITON_INTERPRET=1)
    from . import step as _step
    from .triton import bmm, chunk_cumsum, chunk_scan, chunk_scan_bwd, chunk_state, state_passing

_NO_LIMIT = (0.0, math.inf)
DETERMINISTIC_ENV = "HYBRID_ZOO_DETERMINISTIC"
# the backward keeps a [headdim, d_state] tile of the state gradient in registers
MAX_HEADDIM, MAX_DSTATE = 256, 256


def _states_dtype(x: torch.Tensor, for_backward: bool) -> torch.dtype:
    """The states entering each chunk: float32 when the backward will read them (its decay gradient
    needs them to ~fp32 accuracy), else the inputs' dtype: half the bytes, and the forward's dot
    reads them in that dtype anyway."""
    return torch.float32 if for_backward or x.dtype == torch.float32 else x.dtype


def available() -> bool:
    """Triton imports and can run: on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (tests)."""
    if not _HAVE_TRITON:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def supports(x: torch.Tensor, B: torch.Tensor) -> bool:
    """Shapes and dtypes these kernels handle (others go to the reference)."""
    return (x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.shape[-1] <= MAX_HEADDIM and B.shape[-1] <= MAX_DSTATE)


def _deterministic(flag: bool | None) -> bool:
    if flag is not None:
        return bool(flag)
    return os.environ.get(DETERMINISTIC_ENV, "0") not in ("", "0", "false", "False")


def _empty(like: torch.Tensor) -> torch.Tensor:
    """Stand-in for an absent optional output (custom ops return tensors only)."""
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------
# forward and backward on contiguous tensors

def _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
             for_backward=True):
    """Returns out [b, l, h, p], final_states float32 [b, h, p, n], and what the backward reuses:
    dt_out, dA_cs [b, h, nchunks, chunk_size], states_in [b, nchunks, h, p, n], y (the
    output before the gate; empty without z)."""
    # four launches: stages 1+2 together, 3, 4 (C B^T), 5; chunk_scan.CONFIG["fuse_cb"] folds 4 into 5
    # (one launch fewer, but slower on the GPU at the timed shapes: NOTES.md v3)
    states, dt_out, dA_cs = chunk_state.chunk_state_fwd(x, B, dt, A, dt_bias, dt_softplus, dt_limit, seq_idx,
                                                        chunk_size)
    states_in, final = state_passing.state_passing_fwd(states, dA_cs, initial_states, seq_idx, chunk_size, x.shape[1],
                                                       _states_dtype(x, for_backward))
    CB = None if chunk_scan.CONFIG["fuse_cb"] else bmm.bmm_chunk(C, B, chunk_size)
    out, y = chunk_scan.chunk_scan_fwd(x, z, C, B, CB, dt_out, dA_cs, states_in, D, seq_idx, chunk_size)
    return out, final, dt_out, dA_cs, states_in, (y if y is not None else _empty(x))


def _backward(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
              initial_states, seq_idx, final, dt_out, dA_cs, states_in, y, deterministic):
    """Gradients of (x, dt, A, B, C, D, z, dt_bias, initial_states); None where the input is None."""
    seqlen = x.shape[1]
    if z is not None:
        dy, dz = chunk_scan_bwd.gate_bwd(dout, z, y)
    else:
        dy, dz = dout, None
    CB = bmm.bmm_chunk(C, B, chunk_size)
    # gradient that each chunk's outputs send to the state entering it, then the reverse recurrence
    G = chunk_state.chunk_state(dy, C, dt_out, dA_cs, seq_idx, chunk_size, to_end=False)
    dstates, dinit, dda_last = state_passing.state_passing_bwd(G, dfinal, final, states_in, dA_cs, seq_idx, chunk_size,
                                                 seqlen)
    dx, dB, dC, ddt_part, dda, dD = chunk_scan_bwd.chunk_scan_bwd(x, dy, B, C, CB, dt_out, dA_cs, states_in, dstates, D,
                                                   seq_idx, chunk_size, deterministic)
    ddt, dA, ddt_bias = chunk_cumsum.chunk_cumsum_bwd(dt, A, dt_bias, dt_softplus, dt_limit, chunk_size, dt_out, dda,
                                                      ddt_part, dda_last)
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, (dinit if initial_states is not None else None)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops

if _HAVE_TRITON:
    @torch.library.custom_op("hybrid_zoo::ssd_chunk_scan_fwd", mutates_args=())
    def _ssd_fwd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    chunk_size: int, D: torch.Tensor | None, z: torch.Tensor | None,
                    dt_bias: torch.Tensor | None, dt_softplus: bool, dt_min: float, dt_max: float,
                    initial_states: torch.Tensor | None, seq_idx: torch.Tensor | None, deterministic: bool,
                    for_backward: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, (dt_min, dt_max),
                        initial_states, seq_idx, for_backward)

    @_ssd_fwd_op.register_fake
    def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx,
          deterministic, for_backward):
        batch, seqlen, nheads, headdim = x.shape
        dstate = B.shape[-1]
        nchunks = -(-seqlen // chunk_size)
        f32 = dict(device=x.device, dtype=torch.float32)
        return (torch.empty_like(x), x.new_empty(batch, nheads, headdim, dstate, dtype=torch.float32),
                torch.empty(batch, nheads, nchunks, chunk_size, **f32),
                torch.empty(batch, nheads, nchunks, chunk_size, **f32),
                torch.empty(batch, nchunks, nheads, headdim, dstate, device=x.device, dtype=_states_dtype(x, for_backward)),
                torch.empty_like(x) if z is not None else x.new_empty(0))

    @torch.library.custom_op("hybrid_zoo::ssd_chunk_scan_bwd", mutates_args=())
    def _ssd_bwd_op(dout: torch.Tensor, dfinal: torch.Tensor | None, x: torch.Tensor, dt: torch.Tensor,
                    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
                    D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                    dt_softplus: bool, dt_min: float, dt_max: float, initial_states: torch.Tensor | None,
                    seq_idx: torch.Tensor | None, final: torch.Tensor, dt_out: torch.Tensor,
                    dA_cs: torch.Tensor, states_in: torch.Tensor, y: torch.Tensor, deterministic: bool
                    ) -> list[torch.Tensor]:
        grads = _backward(dout.contiguous(), dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                          (dt_min, dt_max), initial_states, seq_idx, final, dt_out, dA_cs, states_in, y,
                          deterministic)
        return [g if g is not None else _empty(x) for g in grads]

    @_ssd_bwd_op.register_fake
    def _(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
          initial_states, seq_idx, final, dt_out, dA_cs, states_in, y, deterministic):
        f32 = dict(dtype=torch.float32)
        opt = (lambda t, shape: x.new_empty(shape, **f32) if t is not None else x.new_empty(0))
        return [torch.empty_like(x), x.new_empty(dt.shape, **f32), x.new_empty(A.shape, **f32),
                x.new_empty(B.shape, **f32), x.new_empty(C.shape, **f32),
                opt(D, D.shape if D is not None else 0), torch.empty_like(z) if z is not None else x.new_empty(0),
                opt(dt_bias, dt_bias.shape if dt_bias is not None else 0),
                opt(initial_states, initial_states.shape if initial_states is not None else 0)]

    def _setup_context(ctx, inputs, output):
        (x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx,
         deterministic, for_backward) = inputs
        out, final, dt_out, dA_cs, states_in, y = output
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, final, dt_out, dA_cs,
                              states_in, y)
        ctx.args = (chunk_size, dt_softplus, dt_min, dt_max, deterministic)

    def _backward_rule(ctx, dout, dfinal, *_unused):
        (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, final, dt_out, dA_cs, states_in,
         y) = ctx.saved_tensors
        chunk_size, dt_softplus, dt_min, dt_max, deterministic = ctx.args
        if dout is None:
            dout = torch.zeros_like(x)
        dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = _ssd_bwd_op(
            dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
            initial_states, seq_idx, final, dt_out, dA_cs, states_in, y, deterministic)
        cast = (lambda g, t: g.to(t.dtype) if t is not None else None)
        return (dx, cast(ddt, dt), cast(dA, A), cast(dB, B), cast(dC, C), None, cast(dD, D), cast(dz, z),
                cast(ddt_bias, dt_bias), None, None, None, cast(dinit, initial_states), None, None, None)

    _ssd_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


class _SSDFunction(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls: an autograd.Function costs
    a few microseconds of Python where the custom-op dispatcher costs tens, which small shapes feel."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
                deterministic, for_backward):
        out, final, dt_out, dA_cs, states_in, y = _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                                                           dt_limit, initial_states, seq_idx, for_backward)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, final, dt_out, dA_cs,
                              states_in, y)
        ctx.args = (chunk_size, dt_softplus, dt_limit, deterministic)
        ctx.mark_non_differentiable(dt_out, dA_cs, states_in, y)
        return out, final, dt_out, dA_cs, states_in, y

    @staticmethod
    def backward(ctx, dout, dfinal, *_unused):
        (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, final, dt_out, dA_cs, states_in,
         y) = ctx.saved_tensors
        chunk_size, dt_softplus, dt_limit, deterministic = ctx.args
        dout = torch.zeros_like(x) if dout is None else dout.contiguous()
        grads = _backward(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                          initial_states, seq_idx, final, dt_out, dA_cs, states_in, y, deterministic)
        dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = grads
        cast = (lambda g, t: g.to(t.dtype) if g is not None and t is not None else None)
        return (dx, cast(ddt, dt), cast(dA, A), cast(dB, B), cast(dC, C), None, cast(dD, D), cast(dz, z),
                cast(ddt_bias, dt_bias), None, None, cast(dinit, initial_states), None, None, None)


def mamba_chunk_scan_combined(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, chunk_size: int, D: torch.Tensor | None = None,
                              z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                              dt_softplus: bool = False, dt_limit: tuple[float, float] = _NO_LIMIT,
                              initial_states: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                              return_final_states: bool = False, deterministic: bool | None = None):
    """The SSD scan on Triton kernels; arguments as kernels.ssd.mamba_chunk_scan_combined (checked
    there), plus `deterministic` (default: env HYBRID_ZOO_DETERMINISTIC).

    x [b, l, h, p]; dt [b, l, h]; A [h]; B, C [b, l, g, n]; D [h] or [h, p]; z like x;
    initial_states [b, h, p, n]; seq_idx int [b, l] -> y like x (and final_states float32 [b, h, p, n]).
    """
    if not supports(x, B):
        from .reference import mamba_chunk_scan_combined_ref
        return mamba_chunk_scan_combined_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                             dt_softplus=dt_softplus, dt_limit=dt_limit,
                                             initial_states=initial_states, seq_idx=seq_idx,
                                             return_final_states=return_final_states)
    # the kernels take one dtype for x, B, C (the dots' operands) and contiguous rows
    x = x.contiguous()
    B, C = B.to(x.dtype).contiguous(), C.to(x.dtype).contiguous()
    z = z.contiguous() if z is not None else None
    seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    for_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))
    args = (x, dt.contiguous(), A.contiguous(), B, C, int(chunk_size), D.contiguous() if D is not None else None, z,
            dt_bias.contiguous() if dt_bias is not None else None, bool(dt_softplus))
    rest = (initial_states, seq_idx, _deterministic(deterministic), for_backward)
    if torch.compiler.is_compiling():  # the custom op: traceable, with its fake implementation
        out, final, *_ = _ssd_fwd_op(*args, float(dt_limit[0]), float(dt_limit[1]), *rest)
    else:
        out, final, *_ = _SSDFunction.apply(*args, (float(dt_limit[0]), float(dt_limit[1])), *rest)
    return (out, final) if return_final_states else out


if _HAVE_TRITON:
    @torch.library.custom_op("hybrid_zoo::ssd_step", mutates_args=("state",))
    def _ssd_step_op(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                     dt_softplus: bool, dt_min: float, dt_max: float) -> torch.Tensor:
        return _step.ssd_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, (dt_min, dt_max))

    @_ssd_step_op.register_fake
    def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max):
        return torch.empty_like(x, memory_format=torch.contiguous_format)


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
             dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
             dt_limit: tuple[float, float] = _NO_LIMIT) -> torch.Tensor:
    """One decode step in one Triton launch (kernels/ssd/step.py): updates state [b, h, p, n] in place
    and returns y [b, h, p]; arguments as kernels.ssd.ssd_step (checked there)."""
    if not torch.compiler.is_compiling():
        # eager decode is launch-bound: skip the custom-op dispatcher (tens of microseconds of
        # Python per call); the op exists for torch.compile and CUDA-graph capture
        return _step.ssd_step(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), dt_limit)
    return _ssd_step_op(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), float(dt_limit[0]),
                        float(dt_limit[1]))
