"""The fused gated RMSNorm (kernels/norm) against its reference (= layers.norm.gated_rms_norm).

As in test_ssd_triton.py: on the CPU the Triton kernel runs under the interpreter in one child
process started with TRITON_INTERPRET=1 (the variable must precede Triton's import), and the tests
assert on what it measured; with a GPU everything runs natively in this process.
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import randn, measure_under_interpreter, rel_err  # noqa: E402

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (d, group_size, norm_before_gate, with_z, with_weight); widths not powers of two included
CASES = {f"d{d}-g{g}-{'before' if nbg else 'after'}-{'z' if hz else 'noz'}-{'w' if hw else 'now'}": (d, g, nbg, hz, hw)
         for (d, g), nbg, hz, hw in itertools.product(((32, 32), (48, 16), (40, 8)), (False, True), (True, False),
                                                      (True,))}
CASES["d24-g24-after-z-now"] = (24, 24, False, True, False)


def measure_case(d, group_size, norm_before_gate, with_z, with_weight):
    """Relative errors of y, dx, dz, dweight: kernel (float32) vs the reference in float64, and
    the reference against layers.norm.gated_rms_norm (the two copies must agree)."""
    from kernels.norm import gated_rms_norm
    from kernels.norm.reference import gated_rms_norm_ref
    from layers.norm import gated_rms_norm as layer_norm
    x = randn(3, 7, d, seed=1).to(DEVICE)
    z = randn(3, 7, d, seed=2).to(DEVICE) if with_z else None
    w = (1 + 0.3 * randn(d, seed=3)).to(DEVICE) if with_weight else None
    gy = randn(3, 7, d, seed=4).to(DEVICE)

    def grads(fn, dtype):
        leaves = [t.to(dtype).detach().clone().requires_grad_() if t is not None else None for t in (x, z, w)]
        y = fn(leaves[0], leaves[1], leaves[2], 1e-5, group_size, norm_before_gate)
        (y * gy.to(dtype)).sum().backward()
        return [y] + [t.grad for t in leaves if t is not None]

    got = grads(lambda *a: gated_rms_norm(*a, backend="fused"), torch.float32)
    ref = grads(gated_rms_norm_ref, torch.float64)
    layer = grads(layer_norm, torch.float64)
    names = ["y", "dx"] + (["dz"] if with_z else []) + (["dweight"] if with_weight else [])
    out = {n: rel_err(a, b) for n, a, b in zip(names, got, ref)}
    out["reference_vs_layers"] = max(rel_err(a, b) for a, b in zip(ref, layer))
    return out


def measure_all() -> dict:
    return {name: measure_case(*spec) for name, spec in CASES.items()}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    if torch.cuda.is_available():
        return measure_all()
    return measure_under_interpreter(__file__, tmp_path_factory.mktemp("gated_norm_triton"), timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_gated_norm_matches_reference_and_grads(measured, case):
    errs = measured[case]
    assert errs["reference_vs_layers"] <= 1e-12, errs
    for name, err in errs.items():
        assert err <= 1e-5, f"{case}: {name} error {err:.2e}"


def test_bad_group_size_names_the_argument():
    from kernels.norm import gated_rms_norm
    with pytest.raises(ValueError, match="group_size=5"):
        gated_rms_norm(torch.randn(2, 8), None, None, 1e-5, group_size=5)


def test_cpu_input_uses_the_reference_without_interpreter(monkeypatch):
    """On a CPU tensor with no interpreter the public op is the reference itself."""
    from kernels.norm import gated_rms_norm
    from kernels.norm.reference import gated_rms_norm_ref
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, z, w = randn(2, 5, 16, seed=1), randn(2, 5, 16, seed=2), randn(16, seed=3)
    assert torch.equal(gated_rms_norm(x, z, w, 1e-5, 8), gated_rms_norm_ref(x, z, w, 1e-5, 8))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='fused'"):
            gated_rms_norm(x, z, w, 1e-5, 8, backend="fused")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernel check needs a CUDA GPU")
def test_bf16_on_gpu_matches_reference():
    from kernels.norm import gated_rms_norm
    from kernels.norm.reference import gated_rms_norm_ref
    x, z = (randn(4, 256, 1024, seed=s).cuda().bfloat16() for s in (1, 2))
    w = (1 + 0.2 * randn(1024, seed=3)).cuda()
    y = gated_rms_norm(x, z, w, 1e-5, 128, backend="fused")
    assert rel_err(y.float(), gated_rms_norm_ref(x.float(), z.float(), w, 1e-5, 128)) <= 5e-3


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with open(sys.argv[2], "w") as f:
        json.dump(measure_all(), f)
