"""The fused CUDA selective scan (kernels/selective_scan/fused.py, csrc/) against the reference.

On CPU (CI): the kernel translation unit compiles with nvcc for sm_80 and sm_90, and `available()`
says no with a warning. On a GPU: outputs, last states and every gradient against
reference.selective_scan_ref run in float64 on the same inputs, on awkward shapes, with every
output buffer filled with NaN before the kernel writes it.
"""
from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from helpers import assert_close, randn, random_seq_idx, rel_err
from kernels.selective_scan import fused
from kernels.selective_scan.reference import selective_scan_ref

CSRC = Path(fused.__file__).resolve().parent / "csrc"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel needs a CUDA GPU")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    # the kernel translation units include no torch headers, so nvcc alone can check them: machine
    # code for sm_90 (through ptxas: registers, shared memory) and PTX for sm_80 (front end only,
    # which keeps this test near 25 s on two cores)
    jobs = {source: subprocess.Popen(
        ["nvcc", "-std=c++17", "-O3", "-c", str(CSRC / source), "-o", str(tmp_path / f"{source}.o"),
         "-gencode=arch=compute_80,code=compute_80", "-gencode=arch=compute_90,code=sm_90"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for source in ("forward.cu", "backward.cu")}
    for source, job in jobs.items():
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, f"{source}: {err[-3000:]}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_unavailable_without_cuda_warns_once(monkeypatch):
    monkeypatch.setattr(fused, "_warned", False)
    monkeypatch.setattr(fused, "_unavailable_reason", None)
    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        assert fused.available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # a second call stays quiet
        assert fused.available() is False


def test_fused_entry_point_runs_the_reference_where_the_kernel_cannot():
    # CPU tensors (and float64) never reach the CUDA kernel: the result is the reference's, exactly
    inp, sid, _ = make_inputs(1, 6, 9, 4, 2, initial=True, docs=2)
    got = fused.selective_scan_fused(**inp, delta_softplus=True, return_last_state=True, seq_idx=sid)
    want = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True, seq_idx=sid)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------------------------------- GPU


def make_inputs(batch, dim, seqlen, dstate, groups, *, dtype=torch.float32, bc_dtype=None, z=True, D=True,
                bias=True, initial=False, docs=0, seed=0):
    """Mamba-like inputs (A = -(1..dstate) scaled, dt ~ softplus(N(-1, 0.5))), float32 on CPU."""
    s = seed * 100
    inp = dict(
        u=randn(batch, dim, seqlen, seed=s + 1),
        delta=randn(batch, dim, seqlen, seed=s + 2, scale=0.5) - 1.0,
        A=-(torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)
            * (0.5 + torch.rand(dim, 1, generator=torch.Generator().manual_seed(s + 3)))),
        B=randn(batch, groups, dstate, seqlen, seed=s + 4),
        C=randn(batch, groups, dstate, seqlen, seed=s + 5),
        D=randn(dim, seed=s + 6) if D else None,
        z=randn(batch, dim, seqlen, seed=s + 7) if z else None,
        delta_bias=randn(dim, seed=s + 8, scale=0.3) if bias else None,
        initial_state=randn(batch, dim, dstate, seed=s + 9) if initial else None,
    )
    seq_idx = random_seq_idx(batch, seqlen, docs, seed=s + 10) if docs and seqlen > docs else None
    casts = dict(u=dtype, delta=dtype, z=dtype, B=bc_dtype or dtype, C=bc_dtype or dtype)
    return inp, seq_idx, casts


def run_both(inp, seq_idx, casts, softplus=True, deterministic=False, monkeypatch=None):
    """(kernel results, float64 reference results) for out, last state and all gradients."""
    dev = "cuda"
    kin = {k: (None if v is None else v.to(casts.get(k, torch.float32)).to(dev).requires_grad_())
           for k, v in inp.items()}
    rin = {k: (None if v is None else kin[k].detach().double().requires_grad_()) for k, v in inp.items()}
    sid = None if seq_idx is None else seq_idx.to(dev)
    out, last = fused.selective_scan_fused(**kin, delta_softplus=softplus, return_last_state=True,
                                           seq_idx=sid, deterministic=deterministic)
    out_r, last_r = selective_scan_ref(**rin, delta_softplus=softplus, return_last_state=True, seq_idx=sid)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g).to(dev)
    dlast = torch.randn(last.shape, generator=g).to(dev)
    ((out.float() * dout).sum() + (last * dlast).sum()).backward()
    ((out_r * dout.double()).sum() + (last_r * dlast.double()).sum()).backward()
    res = {"out": (out, out_r), "last_state": (last, last_r)}
    for k in kin:
        if kin[k] is not None:
            # no reference gradient: the input does not reach the outputs (A at seqlen 1 from a
            # zero state), so its gradient is exactly zero
            want = rin[k].grad if rin[k].grad is not None else torch.zeros_like(rin[k])
            res["d" + k] = (kin[k].grad, want)
    return res


CASES = [
    # batch, dim, seqlen, dstate, groups, options
    pytest.param(2, 24, 1, 16, 1, dict(), id="seqlen1"),
    pytest.param(2, 24, 63, 16, 2, dict(initial=True, docs=3), id="seqlen63-groups2-init-seqidx"),
    pytest.param(2, 10, 500, 64, 2, dict(initial=True), id="dim10-seqlen500-n64"),
    pytest.param(1, 12, 2048, 256, 1, dict(z=False, docs=4), id="n256-noz-seqidx"),
    pytest.param(2, 16, 8192, 16, 1, dict(initial=True, docs=5), id="seqlen8192-init-seqidx"),
    pytest.param(1, 6, 1000, 16, 3, dict(D=False, bias=False), id="dim6-groups3-noD-nobias"),
    pytest.param(2, 64, 700, 16, 1, dict(initial=True), id="dim64-atomics-across-blocks"),
]


@requires_cuda
@pytest.mark.parametrize("batch,dim,seqlen,dstate,groups,opts", CASES)
def test_fp32_matches_float64_reference(batch, dim, seqlen, dstate, groups, opts, monkeypatch):
    monkeypatch.setattr(fused, "POISON_OUTPUTS", True)
    inp, sid, casts = make_inputs(batch, dim, seqlen, dstate, groups, **opts)
    for name, (got, want) in run_both(inp, sid, casts).items():
        assert_close(got, want, 1e-5 if name in ("out", "last_state") else 3e-5, name)


@requires_cuda
@pytest.mark.parametrize("dtype,bc_dtype,seqlen,dstate,groups,opts", [
    pytest.param(torch.bfloat16, None, 500, 16, 2, dict(initial=True, docs=3), id="bf16-init-seqidx"),
    pytest.param(torch.bfloat16, None, 2048, 64, 1, dict(), id="bf16-2048-n64"),
    pytest.param(torch.float16, None, 8192, 16, 1, dict(docs=2), id="fp16-8192"),
    pytest.param(torch.bfloat16, torch.float32, 300, 16, 2, dict(initial=True), id="bf16-u-fp32-BC"),
])
def test_half_precision_matches_float64_reference(dtype, bc_dtype, seqlen, dstate, groups, opts, monkeypatch):
    monkeypatch.setattr(fused, "POISON_OUTPUTS", True)
    inp, sid, casts = make_inputs(2, 40, seqlen, dstate, groups, dtype=dtype, bc_dtype=bc_dtype, **opts)
    for name, (got, want) in run_both(inp, sid, casts).items():
        assert_close(got, want, 5e-3 if name in ("out", "last_state") else 1e-2, name)


@requires_cuda
@pytest.mark.parametrize("forward_variant,backward_variant,dstate,docs", [
    (0, 0, 20, 3), (1, 1, 20, 3), (2, 0, 20, 0), (3, 1, 20, 0), (4, 0, 20, 3),
    (4, 1, 5, 3), (2, 1, 5, 0), (0, 0, 5, 0)])
def test_launch_variants_match_float64_reference(forward_variant, backward_variant, dstate, docs, monkeypatch):
    # every launch variant the benchmark may pick computes the same function, with seq_idx and
    # without (separate instantiations); dstate 20 spans several dB/dC reduction tiles of 4 state
    # indices and ends in a partial one, dstate 5 is odd; seqlen 1100 ends in a partial warp step
    monkeypatch.setattr(fused, "POISON_OUTPUTS", True)
    monkeypatch.setattr(fused, "FORWARD_VARIANT", forward_variant)
    monkeypatch.setattr(fused, "BACKWARD_VARIANT", backward_variant)
    inp, sid, casts = make_inputs(2, 64, 1100, dstate, 2, initial=True, docs=docs)
    for name, (got, want) in run_both(inp, sid, casts).items():
        assert_close(got, want, 1e-5 if name in ("out", "last_state") else 3e-5, name)


@requires_cuda
def test_no_softplus_and_unaligned_views():
    # u, delta, z are views starting one element into their storage: the 16-byte loads are
    # misaligned, so the kernel must take its scalar path and still be exact
    inp, sid, casts = make_inputs(2, 16, 517, 16, 1, initial=True, bias=False)
    inp["delta"] = inp["delta"].abs() * 0.1        # no softplus: dt must be positive
    dev = "cuda"
    kin = {k: (None if v is None else v.to(dev)) for k, v in inp.items()}
    kin.update({k: torch.cat([torch.zeros(*inp[k].shape[:-1], 1), inp[k]], dim=-1).to(dev)[..., 1:]
                for k in ("u", "delta", "z")})
    assert all(kin[k].storage_offset() == 1 and kin[k].stride(-1) == 1 for k in ("u", "delta", "z"))
    out, last = fused.selective_scan_fused(**kin, return_last_state=True)
    out_r, last_r = selective_scan_ref(**{k: None if v is None else v.double() for k, v in kin.items()},
                                       return_last_state=True)
    assert_close(out, out_r, 1e-5, "out")
    assert_close(last, last_r, 1e-5, "last_state")


@requires_cuda
def test_deterministic_mode_is_bit_identical_and_correct():
    inp, sid, casts = make_inputs(2, 64, 600, 16, 2, initial=True, docs=2)
    first = run_both(inp, sid, casts, deterministic=True)
    second = run_both(inp, sid, casts, deterministic=True)
    for name in first:
        assert torch.equal(first[name][0], second[name][0]), name
        assert_close(first[name][0], first[name][1], 1e-5 if name in ("out", "last_state") else 3e-5, name)


@requires_cuda
def test_continuing_from_last_state_equals_one_call():
    inp, sid, casts = make_inputs(1, 16, 900, 16, 1, initial=True)
    dev = "cuda"
    x = {k: (None if v is None else v.to(dev)) for k, v in inp.items()}
    full, last = fused.selective_scan_fused(**x, delta_softplus=True, return_last_state=True)
    cut = 333
    first = {k: (v[..., :cut] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    second = {k: (v[..., cut:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    y1, h1 = fused.selective_scan_fused(**first, delta_softplus=True, return_last_state=True)
    second["initial_state"] = h1
    y2, h2 = fused.selective_scan_fused(**second, delta_softplus=True, return_last_state=True)
    assert_close(torch.cat([y1, y2], dim=-1), full, 1e-5, "out")
    assert_close(h2, last, 1e-5, "last_state")


@requires_cuda
def test_torch_compile_fullgraph_traces_the_custom_op():
    inp, sid, casts = make_inputs(2, 16, 300, 16, 1, initial=True)
    x = {k: (None if v is None else v.cuda().requires_grad_()) for k, v in inp.items()}

    def f(**kw):
        out, last = fused.selective_scan_fused(**kw, delta_softplus=True, return_last_state=True)
        return out.sum() + last.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(**x)
    loss.backward()
    grads = {k: v.grad.clone() for k, v in x.items() if v is not None}
    for v in x.values():
        if v is not None:
            v.grad = None
    f(**x).backward()
    assert_close(loss, f(**x), 1e-6, "loss")
    for k, gr in grads.items():
        assert_close(gr, x[k].grad, 1e-6, "d" + k)
