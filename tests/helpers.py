"""Shared test helpers: relative error, seeded inputs, decode/prefill invariants.

Import as `from helpers import rel_err, ...` (tests/ is on sys.path via conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere gives inf so it can never pass."""
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = "") -> None:
    """Relative-error check with a readable failure message."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=seeded(seed), dtype=torch.float64) * scale).to(dtype)


def random_seq_idx(batch: int, seqlen: int, n_docs: int, seed: int = 0) -> torch.Tensor:
    """int32 [batch, seqlen], non-decreasing document ids starting at 0, with n_docs documents per
    row (cuts at distinct random positions)."""
    g = seeded(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seqlen - 1, generator=g)[: n_docs - 1] + 1
        marks = torch.zeros(seqlen, dtype=torch.int32)
        marks[cuts] = 1
        rows.append(torch.cumsum(marks, 0, dtype=torch.int32))
    return torch.stack(rows)


def run_in_pieces(layer, x: torch.Tensor, cuts: list[int], **state_kwargs) -> torch.Tensor:
    """Run `layer` over x [batch, seqlen, d] in consecutive pieces split at `cuts`, continuing one
    inference state; returns the concatenated outputs."""
    state = layer.init_state(x.shape[0], dtype=x.dtype, device=x.device, **state_kwargs)
    outs, start = [], 0
    for end in list(cuts) + [x.shape[1]]:
        if end > start:
            out = layer(x[:, start:end], state=state)
            outs.append(out[0] if isinstance(out, tuple) else out)
        start = end
    return torch.cat(outs, dim=1)


def run_documents_separately(layer, x: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Reference for packed sequences: each document of each row run alone, outputs re-packed."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for doc in seq_idx[b].unique():
            pos = (seq_idx[b] == doc).nonzero().squeeze(-1)
            y = layer(x[b:b + 1, pos])
            out[b, pos] = (y[0] if isinstance(y, tuple) else y)[0]
    return out


def scramble_mamba(layer, seed: int = 0):
    """Re-randomise a Mamba-1 layer's weights at larger scales than its init (whose dt ~ 0.001-0.1
    makes the output nearly context-free), so that state or head-mixing bugs change the output
    visibly: A = -exp(A_log) around -1, dt ~ softplus(-1) ~ 0.3, everything else N(0, 0.4^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name == "A_log":
                p.copy_(noise * 0.5)
            elif name in ("dt_proj.bias", "dt_proj_bias"):      # single-head / multi-head (Zamba) names
                p.copy_(noise * 0.5 - 1.0)
            else:
                p.copy_(noise * 0.4)
    return layer


def measure_under_interpreter(test_file: str, out_dir, timeout: int) -> dict:
    """Run `python TEST_FILE --worker OUT.json` with TRITON_INTERPRET=1 (Triton kernels on the CPU) in a
    child process, so the interpreter never touches the rest of the suite; returns what it measured.
    The repository root goes on the child's path: the parent may import it through pytest's rootdir
    alone (no installed package)."""
    path = os.path.join(str(out_dir), "measured.json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), "--worker", path], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(path) as f:
        return json.load(f)
