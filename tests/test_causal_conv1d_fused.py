"""The Triton causal conv1d (kernels/causal_conv1d/triton.py) and the Triton decode step of the
selective scan (kernels/selective_scan/step.py) against their references, plus the dispatch.

Without a GPU the Triton kernels run under Triton's interpreter, which only takes effect when
TRITON_INTERPRET=1 is set before Triton is first imported; other tests import Triton earlier, so on
the CPU every check runs once in a child process started with the variable (`python
tests/test_causal_conv1d_fused.py --worker OUT.json`) and the tests assert on what it measured.
With a GPU the checks run natively in this process.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import measure_under_interpreter, randn, random_seq_idx, rel_err  # noqa: E402

CONV_CASES = {
    # name: batch, seqlen, dim, width, options
    "w4-silu-bias": (2, 70, 40, 4, dict(bias=True, silu=True)),
    "w4-state-seqidx": (2, 70, 40, 4, dict(bias=True, silu=True, state=True, docs=3)),
    "w3-no-activation": (1, 5, 24, 3, dict(bias=False, silu=False, state=True)),
    "w2-seqlen1-state": (3, 1, 8, 2, dict(bias=True, silu=True, state=True)),
    "w4-strided-x": (2, 33, 20, 4, dict(bias=True, silu=True, strided=True, docs=2)),
}

STEP_CASES = {
    # name: batch, dim, dstate, groups, options
    "n16-z-D-bias": (2, 24, 16, 1, dict(z=True, D=True, bias=True)),
    "n5-groups2": (3, 12, 5, 2, dict(z=False, D=True, bias=False)),
    "n16-bare": (1, 40, 16, 1, dict(z=False, D=False, bias=True)),
}


def _conv_inputs(batch, seqlen, dim, width, o, device, seed=0):
    x = randn(batch, seqlen, 2 * dim if o.get("strided") else dim, seed=seed)
    x = (x[..., :dim] if o.get("strided") else x).to(device)            # a view with row stride 2*dim
    weight = randn(dim, width, seed=seed + 1, scale=0.5).to(device)
    bias = randn(dim, seed=seed + 2).to(device) if o.get("bias") else None
    state = randn(batch, dim, width - 1, seed=seed + 3).to(device) if o.get("state") else None
    sid = random_seq_idx(batch, seqlen, o["docs"], seed=seed + 4).to(device) if o.get("docs") else None
    return x, weight, bias, state, sid


def measure_conv(device):
    from kernels.causal_conv1d.reference import causal_conv1d_ref
    from kernels.causal_conv1d.triton import causal_conv1d_fused
    out = {}
    for name, (batch, seqlen, dim, width, o) in CONV_CASES.items():
        x, weight, bias, state, sid = _conv_inputs(batch, seqlen, dim, width, o, device)
        act = "silu" if o["silu"] else None
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight)] + \
                 ([bias.detach().clone().requires_grad_()] if bias is not None else [])
        ref_leaves = [t.detach().clone().double().requires_grad_() for t in leaves]
        st_k = None if state is None else state.clone()
        st_r = None if state is None else state.clone()
        y = causal_conv1d_fused(leaves[0], leaves[1], leaves[2] if bias is not None else None, act, st_k, sid)
        y_r = causal_conv1d_ref(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias is not None else None,
                                act, st_r, sid)
        dy = randn(*y.shape, seed=9).to(device)
        (y * dy).sum().backward()
        (y_r * dy.double()).sum().backward()
        errs = {"y": rel_err(y, y_r)}
        if state is not None:
            errs["conv_state"] = rel_err(st_k, st_r)
        for nm, a, r in zip(("dx", "dweight", "dbias"), leaves, ref_leaves):
            errs[nm] = rel_err(a.grad, r.grad)
        out[name] = errs
    return out


def measure_step(device):
    from kernels.selective_scan.reference import selective_scan_naive
    from kernels.selective_scan.step import selective_state_update
    out = {}
    for name, (batch, dim, dstate, groups, o) in STEP_CASES.items():
        x = randn(batch, dim, seed=1).to(device)
        dt = (randn(batch, dim, seed=2, scale=0.5) - 1).to(device)
        A = -torch.rand(dim, dstate, generator=torch.Generator().manual_seed(3)).add(0.5).to(device)
        B = randn(batch, groups, dstate, seed=4).to(device)
        C = randn(batch, groups, dstate, seed=5).to(device)
        D = randn(dim, seed=6).to(device) if o["D"] else None
        z = randn(batch, dim, seed=7).to(device) if o["z"] else None
        bias = randn(dim, seed=8, scale=0.3).to(device) if o["bias"] else None
        state = randn(batch, dim, dstate, seed=9).to(device)
        want_y, want_state = selective_scan_naive(
            x.unsqueeze(-1).double(), dt.unsqueeze(-1).double(), A.double(), B.unsqueeze(-1).double(),
            C.unsqueeze(-1).double(), D=None if D is None else D.double(),
            z=None if z is None else z.unsqueeze(-1).double(), delta_bias=None if bias is None else bias.double(),
            delta_softplus=True, return_last_state=True, initial_state=state.double())
        got_state = state.clone()
        got_y = selective_state_update(got_state, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
        out[name] = {"out": rel_err(got_y, want_y[..., 0]), "state": rel_err(got_state, want_state)}
    return out


def measure_all(device):
    return {"conv": measure_conv(device), "step": measure_step(device)}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return measure_all("cuda")
    return measure_under_interpreter(__file__, tmp_path_factory.mktemp("conv_step"), timeout=600)


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_triton_conv1d_matches_reference_outputs_state_and_grads(measured, case):
    for name, err in measured["conv"][case].items():
        assert err <= 1e-5, f"{case} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_triton_decode_step_matches_naive_recurrence(measured, case):
    for name, err in measured["step"][case].items():
        assert err <= 1e-5, f"{case} {name}: relative error {err:.2e}"


def test_selective_scan_dispatch_falls_back_to_reference_on_cpu():
    from kernels.selective_scan import selective_scan_fn
    from kernels.selective_scan.reference import selective_scan_ref
    u, delta = randn(2, 8, 12, seed=1), randn(2, 8, 12, seed=2) - 1
    A = -torch.rand(8, 4, generator=torch.Generator().manual_seed(3))
    B, C = randn(2, 1, 4, 12, seed=4), randn(2, 1, 4, 12, seed=5)
    got = selective_scan_fn(u, delta, A, B, C, delta_softplus=True, backend="auto")
    assert torch.equal(got, selective_scan_ref(u, delta, A, B, C, delta_softplus=True))


def test_causal_conv1d_dispatch_falls_back_to_reference_on_cpu():
    from kernels.causal_conv1d import causal_conv1d
    from kernels.causal_conv1d.reference import causal_conv1d_ref
    x, w, b = randn(2, 9, 6, seed=1), randn(6, 4, seed=2), randn(6, seed=3)
    assert torch.equal(causal_conv1d(x, w, b, "silu", backend="auto"), causal_conv1d_ref(x, w, b, "silu"))


def test_decode_step_rejects_mismatched_state():
    from kernels.selective_scan.step import selective_state_update
    with pytest.raises(ValueError, match="state must be"):
        selective_state_update(torch.zeros(1, 4, 3), torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(4, 2),
                               torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    torch.set_num_threads(1)
    with open(sys.argv[2], "w") as f:
        json.dump(measure_all("cpu"), f)
