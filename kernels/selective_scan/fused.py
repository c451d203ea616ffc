"""The fused CUDA selective scan: just-in-time build, torch.library custom ops, autograd.

    selective_scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, initial_state=None, seq_idx=None, deterministic=None)

computes exactly what `reference.selective_scan_ref` specifies (mamba_ssm's signature and layout:
u, delta, z [batch, dim, seqlen]; A [dim, dstate]; B, C [batch, groups, dstate, seqlen] or
[batch, dstate, seqlen]; D, delta_bias [dim]; initial_state [batch, dim, dstate]; seq_idx int32
[batch, seqlen]) with one CUDA kernel per direction (csrc/forward.cu and csrc/backward.cu say how).
Gradients flow to every floating input, including initial_state, and through the returned last state.

Build: the first call compiles csrc/ with torch.utils.cpp_extension.load (ninja) for the GPUs present
(or TORCH_CUDA_ARCH_LIST) into TORCH_EXTENSIONS_DIR, or ~/.cache/hybrid-zoo/torch_extensions;
later runs load the cached build. `available()` is False, with one warning saying why, when there is
no CUDA device, no nvcc or ninja, or the build fails.

Determinism: dB and dC sum over the channels of a group. By default blocks add their partial sums
with float atomics (fast, order-dependent in the last bits); `deterministic=True` or the environment
variable HYBRID_ZOO_DETERMINISTIC=1 writes one partial sum per block instead and adds them in a fixed
order (bit-identical runs; extra memory 2 x batch x dim/8 x dstate x seqlen floats).
"""
from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / "binding.cpp", _CSRC / "forward.cu", _CSRC / "backward.cu"]
_EXT_NAME = "hybrid_zoo_selective_scan"
DETERMINISTIC_ENV = "HYBRID_ZOO_DETERMINISTIC"
# the backward keeps 4 x dstate floats per warp in shared memory: up to 1024 fits every launch variant
MAX_DSTATE = 1024

# tests set this to fill every output with NaN before the kernel writes it (unwritten memory shows)
POISON_OUTPUTS = os.environ.get("HYBRID_ZOO_POISON_OUTPUTS", "0") not in ("", "0")

# launch shape (benchmarks/selective_scan.py times the alternatives; NOTES.md records the choice)
FORWARD_WARPS = 4          # channels per forward block, 1..8
FORWARD_VARIANT = 2        # tokens per lane / register cap, 0..4 (csrc/forward.cu lists them)
BACKWARD_VARIANT = 0       # tokens per lane / blocks per multiprocessor, 0..1 (csrc/backward.cu)

_lock = threading.Lock()
_ext = None
_unavailable_reason: str | None = None
_warned = False


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        root = Path.home() / ".cache" / "hybrid-zoo" / "torch_extensions"
    # one directory per torch/CUDA pair: an extension built against another torch does not load
    tag = f"torch{torch.__version__.split('+')[0]}_cu{(torch.version.cuda or 'none').replace('.', '')}"
    path = Path(root) / tag / _EXT_NAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def _missing_prerequisite() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin") + os.pathsep
                                         + os.environ.get("PATH", "")) is None:
        return "nvcc was not found (set CUDA_HOME to a CUDA toolkit)"
    if shutil.which("ninja") is None:
        return "ninja was not found (pip install ninja)"
    return None


def _load():
    """The compiled extension, built on first use; raises RuntimeError saying why it cannot be."""
    global _ext, _unavailable_reason
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        if _unavailable_reason is not None:
            raise RuntimeError(f"fused selective scan unavailable: {_unavailable_reason}")
        reason = _missing_prerequisite()
        if reason is None:
            from torch.utils.cpp_extension import load
            try:
                _ext = load(name=_EXT_NAME, sources=[str(s) for s in _SOURCES],
                            extra_include_paths=[str(_CSRC)],
                            extra_cflags=["-O3", "-std=c++17"],
                            extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr"],
                            build_directory=str(_build_dir()), verbose=False)
                return _ext
            except Exception as exc:   # compiler errors arrive as RuntimeError/OSError/CalledProcessError
                reason = f"the CUDA build failed ({type(exc).__name__}: {str(exc).strip()[-2000:]})"
        _unavailable_reason = reason
        raise RuntimeError(f"fused selective scan unavailable: {reason}")


def available() -> bool:
    """True when the fused kernel can run here (builds it on the first call, ~1 minute, then cached).
    False on CPU-only machines, without nvcc/ninja, or when the build fails; warns once with the reason."""
    global _warned
    try:
        _load()
        return True
    except RuntimeError as exc:
        if not _warned:
            warnings.warn(f"{exc}; using the PyTorch reference selective scan", RuntimeWarning, stacklevel=2)
            _warned = True
        return False


def _empty(*shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An output buffer the kernel fully overwrites (NaN-filled under POISON_OUTPUTS)."""
    t = torch.empty(*shape, device=like.device, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


# ---------------------------------------------------------------------------------------------
# custom ops: the kernels as opaque operators that torch.compile(fullgraph=True) can trace through


@torch.library.custom_op("hybrid_zoo::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
              seq_idx: Optional[Tensor], delta_softplus: bool, save_states: bool,
              deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """out [b, d, l] (u's dtype), last_state [b, d, n] fp32, chunk_states [b, d, nchunks, n] fp32
    (the state entering every 128-token chunk, for the backward; empty when save_states is False)."""
    ext = _load()
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    out = _empty(batch, dim, seqlen, like=u)
    last_state = _empty(batch, dim, dstate, like=u, dtype=torch.float32)
    nchunks = ext.chunk_count(seqlen)
    chunk_states = (_empty(batch, dim, nchunks, dstate, like=u, dtype=torch.float32)
                    if save_states else u.new_empty(0, dtype=torch.float32))
    ext.forward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus,
                out, last_state, chunk_states if save_states else None, FORWARD_WARPS,
                FORWARD_VARIANT)
    return out, last_state, chunk_states


@_scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus,
                   save_states, deterministic):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    nchunks = (seqlen + 127) // 128
    out = u.new_empty(u.shape)
    last_state = u.new_empty(batch, dim, dstate, dtype=torch.float32)
    chunk_states = (u.new_empty(batch, dim, nchunks, dstate, dtype=torch.float32) if save_states
                    else u.new_empty(0, dtype=torch.float32))
    return out, last_state, chunk_states


@torch.library.custom_op("hybrid_zoo::selective_scan_bwd", mutates_args=())
def _scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], seq_idx: Optional[Tensor],
              chunk_states: Tensor, dout: Tensor, dlast_state: Optional[Tensor], delta_softplus: bool,
              deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients du, ddelta, dz (u's dtype; dz empty without z), dA [d, n], dB, dC [b, g, n, l],
    dD, ddelta_bias [d] (all fp32), dinitial_state [b, d, n] fp32 (dB, dC packed as one [2, ...])."""
    ext = _load()
    batch, dim, seqlen = u.shape
    dstate, groups = A.shape[1], B.shape[1]
    dim_per_group = dim // groups
    warps = ext.backward_warps_per_block(dim_per_group)
    blocks_per_group = dim_per_group // warps
    du = _empty(batch, dim, seqlen, like=u)
    ddelta = _empty(batch, dim, seqlen, like=u)
    dz = _empty(batch, dim, seqlen, like=u) if z is not None else u.new_empty(0)
    f32 = torch.float32
    dA_part = torch.zeros(batch, dim, dstate, device=u.device, dtype=f32)   # accumulated over chunks
    dD_part = _empty(batch, dim, like=u, dtype=f32)
    dbias_part = _empty(batch, dim, like=u, dtype=f32)
    dinitial_state = _empty(batch, dim, dstate, like=u, dtype=f32)
    if deterministic:
        slices, atomic = blocks_per_group, False
        dBC = _empty(2, batch, groups, slices, dstate, seqlen, like=u, dtype=f32)
    elif blocks_per_group > 1:
        slices, atomic = 1, True
        dBC = torch.zeros(2, batch, groups, 1, dstate, seqlen, device=u.device, dtype=f32)
    else:
        slices, atomic = 1, False
        dBC = _empty(2, batch, groups, 1, dstate, seqlen, like=u, dtype=f32)
    ext.backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, chunk_states, dout,
                 dlast_state, du, ddelta, dz if z is not None else None, dA_part, dD_part, dbias_part,
                 dinitial_state, dBC, slices, atomic, BACKWARD_VARIANT)
    dBC = dBC.sum(dim=3) if slices > 1 else dBC.squeeze(3)
    return du, ddelta, dz, dA_part.sum(0), dBC, dD_part.sum(0), dbias_part.sum(0), dinitial_state


@_scan_bwd.register_fake
def _scan_bwd_fake(u, delta, A, B, C, D, z, delta_bias, seq_idx, chunk_states, dout, dlast_state,
                   delta_softplus, deterministic):
    batch, dim, seqlen = u.shape
    dstate, groups = A.shape[1], B.shape[1]
    f32 = dict(dtype=torch.float32)
    return (u.new_empty(u.shape), u.new_empty(u.shape),
            u.new_empty(u.shape) if z is not None else u.new_empty(0),
            u.new_empty(dim, dstate, **f32), u.new_empty(2, batch, groups, dstate, seqlen, **f32),
            u.new_empty(dim, **f32), u.new_empty(dim, **f32), u.new_empty(batch, dim, dstate, **f32))


def _setup_context(ctx, inputs, output):
    (u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, save_states,
     deterministic) = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, output[2])
    ctx.flags = (delta_softplus, deterministic, initial_state is not None)


def _backward(ctx, dout, dlast_state, _dchunk_states):
    u, delta, A, B, C, D, z, delta_bias, seq_idx, chunk_states = ctx.saved_tensors
    delta_softplus, deterministic, has_initial = ctx.flags
    if chunk_states.numel() == 0 and u.shape[2] > 0:
        raise RuntimeError("selective_scan: backward through a forward run without saved states "
                           "(the forward ran with no input requiring grad)")
    dout = torch.zeros_like(u) if dout is None else dout.to(u.dtype).contiguous()
    dlast_state = None if dlast_state is None else dlast_state.float().contiguous()
    du, ddelta, dz, dA, dBC, dD, dbias, dinit = _scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, seq_idx, chunk_states, dout, dlast_state,
        delta_softplus, deterministic)
    return (du, ddelta, dA, dBC[0].to(B.dtype), dBC[1].to(C.dtype),
            dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, dinit if has_initial else None,
            None, None, None, None)


torch.library.register_autograd("hybrid_zoo::selective_scan_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# the public entry point: argument preparation around the op


def _rows(t: Tensor) -> Tensor:
    """Make the last (seqlen) axis contiguous, which the kernel's vector loads need."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float().contiguous()


def selective_scan_fused(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Tensor | None = None, z: Tensor | None = None,
                         delta_bias: Tensor | None = None, delta_softplus: bool = False,
                         return_last_state: bool = False, initial_state: Tensor | None = None,
                         seq_idx: Tensor | None = None, deterministic: bool | None = None):
    """The selective scan on the fused CUDA kernel; arguments and results as
    reference.selective_scan_ref (out [b, d, l] in u's dtype; last_state [b, d, n] fp32).
    Expects tensors of valid shapes (interface.selective_scan_fn checks them). CPU tensors, float64
    and dstate > MAX_DSTATE run the reference instead.
    deterministic: bit-identical gradients (default: env HYBRID_ZOO_DETERMINISTIC=1)."""
    if (not u.is_cuda or u.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or A.shape[1] > MAX_DSTATE or A.is_complex()):
        # float64 (tests, gradcheck) and very large states: the reference computes the same function
        from .reference import selective_scan_ref
        return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state,
                                  initial_state=initial_state, seq_idx=seq_idx)
    if deterministic is None:
        deterministic = os.environ.get(DETERMINISTIC_ENV, "0") not in ("", "0")
    out_dtype = u.dtype
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    if delta.dtype != u.dtype or (z is not None and z.dtype != u.dtype):
        # mixed input dtypes: run in float32 (exact upcast) rather than round anything down
        u, delta = u.float(), delta.float()
        z = None if z is None else z.float()
    if B.dtype != u.dtype or C.dtype != u.dtype:
        B, C = B.float(), C.float()
    u, delta, B, C = _rows(u), _rows(delta), _rows(B), _rows(C)
    z = None if z is None else _rows(z)
    A32, D32, bias32, init32 = _f32(A), _f32(D), _f32(delta_bias), _f32(initial_state)
    sid = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    save_states = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    out, last_state, _ = _scan_fwd(u, delta, A32, B, C, D32, z, bias32, init32, sid,
                                   bool(delta_softplus), save_states, bool(deterministic))
    out = out.to(out_dtype)
    return (out, last_state) if return_last_state else out


selective_scan_fn = selective_scan_fused
