"""Launching already-compiled Triton kernels with less Python per call.

`kernel[grid](...)` goes through JITFunction.run every time: argument binding, specialization, a
cache key built from strings, option parsing, then the compiled kernel's C launcher. With these
kernels' 20-50 arguments that costs tens of microseconds of CPU per launch; on the H200 device
machine the eager SSD forward spent 0.3-0.5 ms of CPU per call, as much as its 0.38 ms of GPU time
(kernels/ssd/NOTES.md, v3), so eager timings followed the CPU.

`fast_launch` wraps a @triton.jit kernel. The first launch of each specialization goes through
Triton as usual; it returns the CompiledKernel, whose C launcher is then called directly by later
launches with the same key. The key holds every scalar argument's exact value, every tensor's
dtype and 16-byte alignment (all that Triton specializes on, and more), the constexprs, the launch
options and the device: a launch that differs in any of them takes Triton's path again.

Off under TRITON_INTERPRET=1 (the interpreter has no compiled kernels), with
HYBRID_ZOO_FAST_LAUNCH=0, and while Triton's launch hooks are set (profilers that use them see
every launch).
"""
from __future__ import annotations

import os

import torch

try:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:  # older Triton: always take the normal path
    _knobs = _driver = None

ENABLED = (_knobs is not None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
           and os.environ.get("HYBRID_ZOO_FAST_LAUNCH", "1") not in ("", "0", "false", "False"))
_SLOW = object()  # marks a key whose launch cannot be replayed (argument layout not understood)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: float32 operands follow
    torch.get_float32_matmul_precision() ("highest", the default: exact fp32 products, as torch's
    own float32 matmuls; otherwise tf32 tensor cores); 16-bit operands are unaffected (tf32 is
    Triton's default)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _active(hook) -> bool:
    """A launch hook that would run: Triton <= 3.6 keeps None when unset, later ones an empty chain."""
    return hook is not None and bool(getattr(hook, "calls", True))


class fast_launch:  # noqa: N801 (used as a decorator)
    """`@fast_launch` above `@triton.jit`; call sites stay `kernel[grid](*args, CONST=..., num_warps=...)`
    with every runtime argument positional and every constexpr (and option) by keyword."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.cache = {}
        params = getattr(kernel, "params", None)
        self.n_runtime = self.constexpr_names = None
        if params is not None:
            flags = [p.is_constexpr for p in params]
            n = flags.index(True) if True in flags else len(flags)
            if not any(flags[:n]) and all(flags[n:]):  # runtime arguments first, constexprs last
                self.n_runtime = n
                self.constexpr_names = tuple(p.name for p in params[n:])

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args, kwargs):
        if not ENABLED or self.n_runtime is None:
            return self.kernel[grid](*args, **kwargs)
        hooks = _knobs.runtime
        if _active(hooks.launch_enter_hook) or _active(hooks.launch_exit_hook):
            return self.kernel[grid](*args, **kwargs)
        device = _driver.active.get_current_device()
        key = (device, tuple(kwargs.items()),
               tuple([(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a for a in args]))
        entry = self.cache.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            self.cache[key] = self._entry(compiled, args, kwargs)
            return compiled
        if entry is _SLOW:
            return self.kernel[grid](*args, **kwargs)
        run, function, packed_metadata, constexprs = entry
        g = tuple(grid) + (1, 1)
        run(g[0], g[1], g[2], _driver.active.get_current_stream(device), function, packed_metadata, None, None, None,
            *args, *constexprs)
        return None

    def _entry(self, compiled, args, kwargs):
        if hasattr(compiled, "result"):  # Triton versions that compile asynchronously
            compiled = compiled.result()
        run = getattr(compiled, "run", None)
        function = getattr(compiled, "function", None)
        packed = getattr(compiled, "packed_metadata", None)
        if (run is None or function is None or packed is None or len(args) != self.n_runtime
                or any(name not in kwargs for name in self.constexpr_names)):
            return _SLOW
        return run, function, packed, tuple(kwargs[name] for name in self.constexpr_names)
