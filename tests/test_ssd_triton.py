"""The Triton SSD kernels (kernels/ssd/fused.py, kernels/ssd/step.py) against the reference.

Without a GPU the kernels run under Triton's interpreter. TRITON_INTERPRET=1 only takes effect if
it is set before Triton itself is imported (Triton's own library functions, such as tl.cumsum, are
decorated at that moment), and other tests or torch may import Triton first; so on the CPU every
check runs once in a child process started with the variable set (`python tests/test_ssd_triton.py
--worker OUT.json`), and the tests below assert on what it measured. The rest of the suite never
sees the variable. With a GPU the checks run natively, in this process.

Checks: tiny float32 shapes (seqlen 1, 17, 64, 100; chunk sizes 16 and 32; ngroups 1 and 2; with and
without D, z, initial states, seq_idx): outputs, final states and every gradient against
kernels.ssd.reference in float64; deterministic mode; decode steps continuing a prefill; the custom
op's registrations (torch.library.opcheck). The full real-size bf16 check is benchmarks/ssd.py.
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import assert_close, randn, random_seq_idx, measure_under_interpreter, rel_err  # noqa: E402

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

NO_LIMIT = (0.0, math.inf)
GRADS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
LOW_PRECISION = ("x", "dt", "B", "C", "z")


def make_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, *, D="h", z=True, init=True, n_docs=0,
                seed=0):
    """Random float32 inputs (decays well inside (0, 1)); D: None, "h" ([nheads]) or "hp"."""
    t = dict(
        x=randn(batch, seqlen, nheads, headdim, seed=seed),
        dt=randn(batch, seqlen, nheads, seed=seed + 1) - 1.0,
        A=-torch.exp(randn(nheads, seed=seed + 2, scale=0.5)),
        B=randn(batch, seqlen, ngroups, dstate, seed=seed + 3, scale=dstate ** -0.5),
        C=randn(batch, seqlen, ngroups, dstate, seed=seed + 4, scale=dstate ** -0.5),
        D=None if D is None else randn(*((nheads,) if D == "h" else (nheads, headdim)), seed=seed + 5),
        z=randn(batch, seqlen, nheads, headdim, seed=seed + 6) if z else None,
        dt_bias=randn(nheads, seed=seed + 7, scale=0.5),
        initial_states=randn(batch, nheads, headdim, dstate, seed=seed + 8) if init else None,
    )
    seq_idx = random_seq_idx(batch, seqlen, n_docs, seed=seed + 9) if n_docs > 1 else None
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in t.items()}, (
        seq_idx.to(DEVICE) if seq_idx is not None else None)


def run_with_grads(fn, inputs, seq_idx, chunk_size, dt_limit, dtype, **extra):
    """Forward fn, then backward of a fixed random projection of (y, final_states). dtype applies to
    the activations (x, dt, B, C, z); parameters and states stay float32 (all float64 for float64)."""
    def cast(k, v):
        return v.to(dtype if dtype == torch.float64 or k in LOW_PRECISION else torch.float32)
    leaves = {k: (cast(k, v).detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y, final = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size, D=leaves["D"],
                  z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True, dt_limit=dt_limit,
                  initial_states=leaves["initial_states"], seq_idx=seq_idx, return_final_states=True, **extra)
    gy = randn(*y.shape, seed=100).to(y.device, y.dtype)
    gf = randn(*final.shape, seed=101).to(final.device, final.dtype)
    ((y * gy).sum() + (final * gf).sum()).backward()
    return y, final, {k: leaves[k].grad for k in GRADS if leaves[k] is not None}


CASES = {
    # id: (batch, seqlen, nheads, headdim, dstate, ngroups, chunk_size, options)
    "seqlen1": (1, 1, 2, 16, 16, 1, 16, dict()),
    "seqlen17-groups2-seqidx-Dhp": (2, 17, 4, 16, 16, 2, 16, dict(D="hp", z=False, n_docs=3)),
    "seqlen64-chunk32-seqidx": (1, 64, 2, 16, 32, 1, 32, dict(D=None, init=False, n_docs=2)),
    "seqlen100-partial-chunk-limit": (2, 100, 4, 8, 16, 2, 32, dict(n_docs=4, dt_limit=(0.05, 0.5))),
    "seqlen100-plain": (1, 100, 2, 16, 16, 1, 16, dict(D=None, z=False, init=False)),
}


# ---------------------------------------------------------------------------------------------
# measurements (run natively on a GPU, or in the interpreter child process on the CPU)

def measure_case(fused, batch, seqlen, nheads, headdim, dstate, ngroups, chunk_size, opts):
    """Relative errors of y, final_states and every gradient: kernels in float32 vs the reference
    in float64."""
    from kernels.ssd.reference import mamba_chunk_scan_combined_ref
    opts = dict(opts)
    dt_limit = tuple(opts.pop("dt_limit", NO_LIMIT))
    inputs, seq_idx = make_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, **opts)
    y, final, grads = run_with_grads(fused.mamba_chunk_scan_combined, inputs, seq_idx, chunk_size, dt_limit,
                                     torch.float32)
    ry, rfinal, rgrads = run_with_grads(mamba_chunk_scan_combined_ref, inputs, seq_idx, chunk_size, dt_limit,
                                        torch.float64)
    errs = {"y": rel_err(y, ry), "final_states": rel_err(final, rfinal)}
    errs.update({f"d{k}": rel_err(grads[k], rgrads[k]) for k in rgrads})
    errs["missing_grads"] = sorted(set(rgrads) - set(grads))
    return errs


def measure_deterministic(fused):
    """8 heads in one group, forced to split the dB/dC sums over several programs: deterministic
    runs compared bitwise, the atomic mode by relative error."""
    inputs, seq_idx = make_inputs(1, 40, 8, 16, 16, 1, n_docs=2, seed=5)
    saved = dict(fused.chunk_scan_bwd.CONFIG)
    fused.chunk_scan_bwd.CONFIG["min_programs"] = 1 << 20
    try:
        runs = [run_with_grads(fused.mamba_chunk_scan_combined, inputs, seq_idx, 16, NO_LIMIT, torch.float32,
                               deterministic=det)[2] for det in (True, True, False)]
    finally:
        fused.chunk_scan_bwd.CONFIG.clear()
        fused.chunk_scan_bwd.CONFIG.update(saved)
    split = fused.chunk_scan_bwd._heads_per_prog(1, 3, 8, 1, 1, 1 << 20) < 8
    return {"split": split,
            "bitwise_equal": {k: bool(torch.equal(runs[0][k], runs[1][k])) for k in runs[0]},
            "atomic_vs_deterministic": {k: rel_err(runs[2][k], runs[0][k]) for k in runs[0]}}


def measure_decode(fused):
    """Prefill with the fused scan, continue with fused single steps: errors of each step against
    ssd_step_ref, of the carried state, and of all outputs against the reference over the whole
    sequence."""
    from kernels.ssd.reference import mamba_chunk_scan_combined_ref, ssd_step_ref
    batch, seqlen, nheads, headdim, dstate, ngroups = 2, 20, 4, 16, 16, 2
    inputs, _ = make_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, D="hp", init=False, seed=11)
    x, dt, A, B, C, D, z, bias = (inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"))
    kw = dict(D=D, dt_bias=bias, dt_softplus=True, dt_limit=(0.01, 1.0))
    ref = mamba_chunk_scan_combined_ref(x, dt, A, B, C, 16, z=z, **kw)
    prefill = 13
    y0, state = fused.mamba_chunk_scan_combined(x[:, :prefill], dt[:, :prefill], A, B[:, :prefill],
                                                C[:, :prefill], 16, z=z[:, :prefill], return_final_states=True, **kw)
    ys, ref_state, step_errs, state_errs = [y0], state.clone(), [], []
    for t in range(prefill, seqlen):
        ys.append(fused.ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], z=z[:, t], **kw).unsqueeze(1))
        y_ref = ssd_step_ref(ref_state, x[:, t], dt[:, t], A, B[:, t], C[:, t], z=z[:, t], **kw)
        step_errs.append(rel_err(ys[-1][:, 0], y_ref))
        state_errs.append(rel_err(state, ref_state))
    return {"step": max(step_errs), "state": max(state_errs), "whole": rel_err(torch.cat(ys, 1), ref)}


def measure_opcheck(fused):
    """torch.library.opcheck of the forward op (schema, fake implementation, autograd registration:
    what torch.compile relies on); returns the failure text or ''."""
    inputs, seq_idx = make_inputs(1, 20, 2, 16, 16, 1, n_docs=2, seed=3)
    args = (inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 16, inputs["D"], inputs["z"],
            inputs["dt_bias"], True, 0.0, math.inf, inputs["initial_states"], seq_idx, True, True)
    try:
        torch.library.opcheck(fused._ssd_fwd_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    except Exception:  # reported to the test, which fails with it
        return traceback.format_exc(limit=3)
    return ""


def measure_compile(fused):
    """torch.compile(fullgraph=True) through the custom ops (aot_eager: dynamo + AOT autograd with
    the fake implementations, no code generation): forward and gradients against eager."""
    import torch._dynamo
    inputs, seq_idx = make_inputs(1, 24, 2, 16, 16, 1, n_docs=2, seed=4)

    def fn(x, dt, A, B, C, chunk_size, **kw):
        return fused.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, **kw)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    try:
        y, final, grads = run_with_grads(compiled, inputs, seq_idx, 16, NO_LIMIT, torch.float32)
    except Exception:  # reported to the test, which fails with it
        return {"error": traceback.format_exc(limit=4)}
    ry, rfinal, rgrads = run_with_grads(fused.mamba_chunk_scan_combined, inputs, seq_idx, 16, NO_LIMIT,
                                        torch.float32)
    errs = {"y": rel_err(y, ry), "final_states": rel_err(final, rfinal)}
    errs.update({f"d{k}": rel_err(grads[k], rgrads[k]) for k in rgrads})
    return errs


def measure_step_op(fused):
    """The decode step through its custom op (the path torch.compile takes) against ssd_step_ref."""
    from kernels.ssd.reference import ssd_step_ref
    inputs, _ = make_inputs(2, 1, 4, 16, 16, 2, D="h", init=True, seed=13)
    x, dt, B, C, z = (inputs[k][:, 0] for k in ("x", "dt", "B", "C", "z"))
    A, D, bias, state = inputs["A"], inputs["D"], inputs["dt_bias"], inputs["initial_states"]
    s1, s2 = state.clone(), state.clone()
    y1 = fused._ssd_step_op(s1, x, dt, A, B, C, D, z, bias, True, 0.0, math.inf)
    y2 = ssd_step_ref(s2, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
    return {"y": rel_err(y1, y2), "state": rel_err(s1, s2)}


def measure_all() -> dict:
    import kernels.ssd.fused as fused
    out = {"cases": {name: measure_case(fused, *spec) for name, spec in CASES.items()}}
    out["compile"] = measure_compile(fused)
    out["deterministic"] = measure_deterministic(fused)
    out["decode"] = measure_decode(fused)
    out["step_op"] = measure_step_op(fused)
    out["opcheck"] = measure_opcheck(fused)
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    if torch.cuda.is_available():
        return measure_all()
    return measure_under_interpreter(__file__, tmp_path_factory.mktemp("ssd_triton"), timeout=600)


# ---------------------------------------------------------------------------------------------
# tests

@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_reference_outputs_states_and_grads(measured, case):
    errs = measured["cases"][case]
    assert errs["missing_grads"] == [], f"no gradient for {errs['missing_grads']}"
    for name, err in errs.items():
        if name != "missing_grads":
            assert err <= (1e-5 if name in ("y", "final_states") else 1e-4), f"{case}: {name} error {err:.2e}"


def test_deterministic_mode_is_bitwise_repeatable_and_agrees_with_atomic_mode(measured, monkeypatch):
    det = measured["deterministic"]
    assert det["split"], "the case must split a group's heads over programs to exercise the partial sums"
    assert all(det["bitwise_equal"].values()), det["bitwise_equal"]
    assert max(det["atomic_vs_deterministic"].values()) <= 1e-5, det["atomic_vs_deterministic"]
    import kernels.ssd.fused as fused
    monkeypatch.setenv(fused.DETERMINISTIC_ENV, "1")
    assert fused._deterministic(None) and not fused._deterministic(False)
    monkeypatch.setenv(fused.DETERMINISTIC_ENV, "0")
    assert not fused._deterministic(None)


def test_decode_steps_continue_the_fused_scan(measured):
    errs = measured["decode"]
    assert errs["step"] <= 1e-5 and errs["state"] <= 1e-5 and errs["whole"] <= 1e-5, errs
    errs = measured["step_op"]
    assert errs["y"] <= 1e-5 and errs["state"] <= 1e-5, errs


def test_custom_op_registrations_pass_opcheck(measured):
    assert measured["opcheck"] == "", measured["opcheck"]


def test_torch_compile_fullgraph_traces_the_custom_ops(measured):
    errs = measured["compile"]
    assert "error" not in errs, errs.get("error")
    assert max(errs.values()) <= 1e-6, errs


def test_unsupported_shapes_fall_back_to_the_reference():
    import kernels.ssd.fused as fused
    from kernels.ssd.reference import mamba_chunk_scan_combined_ref
    inputs, _ = make_inputs(1, 5, 1, 300, 16, 1, seed=2)   # headdim beyond the kernels' register tile
    x, dt, A, B, C = (inputs[k] for k in ("x", "dt", "A", "B", "C"))
    assert not fused.supports(x, B)
    assert_close(fused.mamba_chunk_scan_combined(x, dt, A, B, C, 16),
                 mamba_chunk_scan_combined_ref(x, dt, A, B, C, 16), 1e-6, "fallback")


def test_fast_launch_replays_the_compiled_launcher_only_for_an_identical_launch(monkeypatch):
    """kernels/ssd/triton/launch.py on a stand-in kernel: the first launch goes through Triton, a
    repeat calls the compiled launcher with Triton's argument order (constexprs in signature order),
    and any change Triton could specialize on goes through Triton again."""
    import types
    from kernels.ssd.triton import launch
    calls = []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *args):
            calls.append(("launcher",) + args)

    class Kernel:
        params = [types.SimpleNamespace(name=n, is_constexpr=c)
                  for n, c in (("x_ptr", False), ("n", False), ("BLOCK", True), ("FLAG", True))]

        def __getitem__(self, grid):
            def jit_run(*args, **kwargs):
                calls.append(("triton", grid, args, kwargs))
                return Compiled()
            return jit_run

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 1234

    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "_driver", types.SimpleNamespace(active=Driver()))
    kernel = launch.fast_launch(Kernel())
    x = torch.zeros(8)
    base = dict(FLAG=True, BLOCK=64, num_warps=4)
    kernel[(3,)](x, 16, **base)
    kernel[(3,)](x, 16, **base)
    assert [c[0] for c in calls] == ["triton", "launcher"]
    assert calls[1] == ("launcher", 3, 1, 1, 1234, "function", "metadata", None, None, None, x, 16, 64, True)
    changed = [((x, 17), {}), ((x.double(), 16), {}), ((x[1:], 16), {}), ((x, 16), dict(BLOCK=32)),
               ((x, 16), dict(num_warps=8))]
    for args, kw in changed:
        n = len(calls)
        kernel[(3,)](*args, **{**base, **kw})
        assert calls[n][0] == "triton", (args, kw)
    # a profiler's launch hook must see every launch
    hooks = types.SimpleNamespace(launch_enter_hook=lambda metadata: None, launch_exit_hook=None)
    monkeypatch.setattr(launch, "_knobs", types.SimpleNamespace(runtime=hooks))
    n = len(calls)
    kernel[(3,)](x, 16, **base)
    assert calls[n][0] == "triton"
    monkeypatch.setattr(launch, "ENABLED", False)
    n = len(calls)
    kernel[(3,)](x, 16, **base)
    assert calls[n][0] == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels at larger sizes need a CUDA GPU")
@pytest.mark.parametrize("headdim,dstate,ngroups", [(64, 128, 1), (128, 64, 4)])
def test_bf16_on_gpu_matches_reference(headdim, dstate, ngroups):
    import kernels.ssd.fused as fused
    from kernels.ssd.reference import mamba_chunk_scan_combined_ref
    inputs, seq_idx = make_inputs(2, 1000, 8, headdim, dstate, ngroups, n_docs=3, seed=7)
    # the reference sees the same bf16-rounded activations, in float32
    inputs = {k: (v.bfloat16().float() if k in LOW_PRECISION and v is not None else v) for k, v in inputs.items()}
    ry, rfinal, rgrads = run_with_grads(mamba_chunk_scan_combined_ref, inputs, seq_idx, 256, NO_LIMIT,
                                        torch.float32)
    for attempt in ("first call", "repeat (replayed launches)"):
        y, final, grads = run_with_grads(fused.mamba_chunk_scan_combined, inputs, seq_idx, 256, NO_LIMIT,
                                         torch.bfloat16)
        assert_close(y.float(), ry, 5e-3, f"{attempt}: y")
        assert_close(final, rfinal, 5e-3, f"{attempt}: final_states")
        for name in rgrads:
            assert_close(grads[name].float(), rgrads[name], 1e-2, f"{attempt}: d{name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Mamba2 layer's fused path needs a CUDA GPU")
def test_mamba2_layer_on_cuda_runs_the_fused_kernels_and_matches_the_reference_backend(monkeypatch):
    """Mamba2 end to end on CUDA with the default backend (fused scan and decode step) against a copy
    with backend="reference": outputs and every parameter's gradient in float32, a prefill continued
    by decode steps against the full forward, and a bf16 layer against the float32 one."""
    import copy

    import kernels.ssd.fused as fused
    from layers.mamba2 import Mamba2
    calls = {"scan": 0, "step": 0}
    scan, step = fused.mamba_chunk_scan_combined, fused.ssd_step

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(fused, "mamba_chunk_scan_combined", counting("scan", scan))
    monkeypatch.setattr(fused, "ssd_step", counting("step", step))

    torch.manual_seed(0)
    layer = Mamba2(d_model=256, d_state=64, headdim=32, ngroups=2, chunk_size=64, device="cuda")
    with torch.no_grad():  # decays of 0.2-0.9 per step and unit-scale activations: long memory
        for name, param in layer.named_parameters():
            if name in ("A_log", "dt_bias"):
                param.uniform_(-1.0, 0.5)
            elif param.dim() >= 2:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    x = torch.randn(2, 200, 256, device="cuda")
    y = layer(x)
    assert calls["scan"] == 1, "the default backend on CUDA must run the fused scan"
    y_ref = ref(x)
    assert_close(y, y_ref, 1e-4, "y")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(layer.parameters()), gy)
    grads_ref = torch.autograd.grad(y_ref, list(ref.parameters()), gy)
    for (name, _), g, g_ref in zip(layer.named_parameters(), grads, grads_ref):
        assert_close(g, g_ref, 1e-3, f"d{name}")

    with torch.no_grad():
        state = layer.init_state(2)
        pieces = [layer(x[:, :150], state=state)] + [layer(x[:, t:t + 1], state=state) for t in range(150, 156)]
        assert calls["step"] == 6, "decode steps on CUDA must run the fused step"
        assert_close(torch.cat(pieces, 1), layer(x[:, :156]), 1e-4, "prefill + decode")
        y16 = copy.deepcopy(layer).to(torch.bfloat16)(x.bfloat16())
        assert y16.dtype == torch.bfloat16
        assert_close(y16.float(), y, 3e-2, "bf16 layer")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with open(sys.argv[2], "w") as f:
        json.dump(measure_all(), f)
