"""The one place that decides between fused kernels and the pure-PyTorch references.

HYBRID_ZOO_KERNELS=auto       (default) fused kernels where the input is on CUDA and the kernel
                              supports it, the reference otherwise
HYBRID_ZOO_KERNELS=reference  always the pure-PyTorch references
HYBRID_ZOO_KERNELS=fused      fused kernels; an error where they cannot run (instead of falling back)

Each op also takes `backend=` ("auto" | "reference" | "fused") overriding the variable per call.
"""
from __future__ import annotations

import os

BACKENDS = ("auto", "reference", "fused")
ENV_VAR = "HYBRID_ZOO_KERNELS"


def resolve_backend(backend: str | None = None) -> str:
    """The backend to use for one call: the argument if given, else the environment variable."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise ValueError(f"{source}{choice!r} is not a kernel backend: use one of {', '.join(BACKENDS)}")
    return choice
