"""The SSD reference (chunked algorithm) against the token-by-token recurrence in float64, its
gradients, the decode step, and the public interface's argument checks."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, randn, random_seq_idx

from kernels.ssd import mamba_chunk_scan_combined, ssd_step
from kernels.ssd.reference import mamba_chunk_scan_combined_ref, ssd_naive, ssd_step_ref

F64 = torch.float64


def make_inputs(batch=2, seqlen=17, nheads=4, headdim=3, ngroups=1, d_state=5, dtype=F64, seed=0,
                D_shape="h"):
    """Random SSD arguments; A negative (a decaying state) as in every Mamba-2 layer."""
    s = seed * 100
    args = dict(
        x=randn(batch, seqlen, nheads, headdim, seed=s + 1, dtype=dtype),
        dt=randn(batch, seqlen, nheads, seed=s + 2, dtype=dtype),
        A=-torch.linspace(0.3, 2.0, nheads, dtype=dtype),
        B=randn(batch, seqlen, ngroups, d_state, seed=s + 3, dtype=dtype),
        C=randn(batch, seqlen, ngroups, d_state, seed=s + 4, dtype=dtype),
    )
    extra = dict(
        D=randn(*((nheads,) if D_shape == "h" else (nheads, headdim)), seed=s + 5, dtype=dtype),
        z=randn(batch, seqlen, nheads, headdim, seed=s + 6, dtype=dtype),
        dt_bias=randn(nheads, seed=s + 7, dtype=dtype, scale=0.5),
        initial_states=randn(batch, nheads, headdim, d_state, seed=s + 8, dtype=dtype),
    )
    return args, extra


def check_against_naive(args, chunk_size, tol=1e-12, **kw):
    y, final = mamba_chunk_scan_combined_ref(**args, chunk_size=chunk_size, return_final_states=True, **kw)
    y_ref, final_ref = ssd_naive(**args, return_final_states=True, **kw)
    assert y.dtype == args["x"].dtype
    assert_close(y, y_ref, tol, "y")
    assert_close(final, final_ref, tol, "final_states")


@pytest.mark.parametrize("seqlen", [1, 17, 64, 100])
@pytest.mark.parametrize("chunk_size", [16, 32])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_chunked_matches_recurrence_with_every_option(seqlen, chunk_size, ngroups):
    args, extra = make_inputs(seqlen=seqlen, ngroups=ngroups, seed=seqlen + ngroups)
    seq_idx = random_seq_idx(2, seqlen, min(3, seqlen), seed=seqlen)
    check_against_naive(args, chunk_size, **extra, dt_softplus=True, dt_limit=(0.05, 1.5), seq_idx=seq_idx)


@pytest.mark.parametrize("seqlen", [1, 17, 100])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_chunked_matches_recurrence_plain(seqlen, ngroups):
    args, _ = make_inputs(seqlen=seqlen, ngroups=ngroups, seed=seqlen)
    args["dt"] = args["dt"].abs()          # without softplus dt must already be a step size
    check_against_naive(args, 16)


@pytest.mark.parametrize("option", ["D", "D_hp", "z", "dt_bias", "dt_limit", "initial_states"])
def test_each_option_matches_recurrence(option):
    args, extra = make_inputs(seqlen=40, ngroups=2, D_shape="hp" if option == "D_hp" else "h")
    kw = {"dt_softplus": True}
    if option == "dt_limit":
        kw["dt_limit"] = (0.2, 0.6)
    elif option == "dt_bias":
        kw["dt_bias"] = extra["dt_bias"]
    else:
        kw[option.split("_hp")[0]] = extra[option.split("_hp")[0]]
    check_against_naive(args, 16, **kw)


@pytest.mark.parametrize("cuts", [[16], [32], [15, 16, 17], [1, 31, 32, 33, 48], [63]],
                         ids=lambda c: "cuts" + "-".join(map(str, c)))
def test_document_starts_at_and_inside_chunk_edges(cuts):
    seqlen = 64
    args, extra = make_inputs(batch=1, seqlen=seqlen, seed=len(cuts))
    seq_idx = torch.zeros(1, seqlen, dtype=torch.int32)
    for c in cuts:
        seq_idx[:, c:] += 1
    check_against_naive(args, 16, z=extra["z"], D=extra["D"], initial_states=extra["initial_states"],
                        dt_softplus=True, seq_idx=seq_idx)


def test_packed_documents_equal_documents_run_alone():
    args, extra = make_inputs(batch=1, seqlen=50, ngroups=2)
    init = extra["initial_states"][:1]
    cuts = [0, 7, 16, 30, 50]
    seq_idx = torch.zeros(1, 50, dtype=torch.int32)
    for c in cuts[1:-1]:
        seq_idx[:, c:] += 1
    y_packed, final = mamba_chunk_scan_combined_ref(**args, chunk_size=16, dt_softplus=True, seq_idx=seq_idx,
                                                    initial_states=init, return_final_states=True)
    for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        piece = {k: (v[:, lo:hi] if v.dim() > 1 else v) for k, v in args.items()}
        # the initial state belongs to the first document only
        y_doc, final_doc = mamba_chunk_scan_combined_ref(**piece, chunk_size=16, dt_softplus=True,
                                                         initial_states=init if i == 0 else None,
                                                         return_final_states=True)
        assert_close(y_packed[:, lo:hi], y_doc, 1e-12, f"document {i}")
    assert_close(final, final_doc, 1e-12, "final state is the last document's")


def test_continuing_from_final_state_equals_one_call():
    args, extra = make_inputs(seqlen=45, ngroups=2)
    kw = dict(D=extra["D"], dt_bias=extra["dt_bias"], dt_softplus=True)
    y_full, s_full = mamba_chunk_scan_combined_ref(**args, chunk_size=16, return_final_states=True, **kw)
    first = {k: (v[:, :20] if v.dim() > 1 else v) for k, v in args.items()}
    second = {k: (v[:, 20:] if v.dim() > 1 else v) for k, v in args.items()}
    y1, s1 = mamba_chunk_scan_combined_ref(**first, chunk_size=16, return_final_states=True, **kw)
    y2, s2 = mamba_chunk_scan_combined_ref(**second, chunk_size=16, initial_states=s1,
                                           return_final_states=True, **kw)
    assert_close(torch.cat([y1, y2], 1), y_full, 1e-12, "y")
    assert_close(s2, s_full, 1e-12, "final state")


def test_float32_reference_matches_float64_recurrence():
    args, extra = make_inputs(seqlen=100, ngroups=2, dtype=torch.float32)
    y, final = mamba_chunk_scan_combined_ref(**args, chunk_size=32, **extra, dt_softplus=True,
                                             return_final_states=True)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    y_ref, final_ref = ssd_naive(**{k: v.double() for k, v in args.items()},
                                 **{k: v.double() for k, v in extra.items()}, dt_softplus=True,
                                 return_final_states=True)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(final, final_ref, 1e-5, "final_states")


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float64():
    args, extra = make_inputs(seqlen=33, dtype=torch.bfloat16)
    y, final = mamba_chunk_scan_combined_ref(**args, chunk_size=16, D=extra["D"], dt_softplus=True,
                                             return_final_states=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y_ref = ssd_naive(**{k: v.double() for k, v in args.items()}, D=extra["D"].double(), dt_softplus=True)
    assert_close(y, y_ref, 1e-2, "y")


def test_gradients_match_finite_differences():
    args, extra = make_inputs(batch=1, seqlen=7, nheads=2, headdim=2, ngroups=2, d_state=2, D_shape="hp")
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.int32)
    names = list(args) + list(extra)
    tensors = [t.clone().requires_grad_() for t in list(args.values()) + list(extra.values())]

    def fn(*ts):
        kw = dict(zip(names, ts))
        y, final = mamba_chunk_scan_combined_ref(**kw, chunk_size=4, dt_softplus=True, seq_idx=seq_idx,
                                                 return_final_states=True)
        return y, final

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7)


def test_gradients_equal_recurrence_gradients():
    args, extra = make_inputs(seqlen=37, ngroups=2)
    leaves = {k: v.clone().requires_grad_() for k, v in {**args, **extra}.items()}
    w = randn(2, 37, 4, 3, seed=99, dtype=F64)
    seq_idx = random_seq_idx(2, 37, 3, seed=5)
    grads = []
    for fn in (mamba_chunk_scan_combined_ref, ssd_naive):
        y, final = fn(**leaves, chunk_size=16, dt_softplus=True, seq_idx=seq_idx, return_final_states=True)
        grads.append(torch.autograd.grad((y * w).sum() + final.sum(), list(leaves.values())))
    for name, g, g_ref in zip(leaves, *grads):
        assert_close(g, g_ref, 1e-10, f"d{name}")


@pytest.mark.parametrize("ngroups", [1, 2])
def test_decode_steps_equal_recurrence(ngroups):
    args, extra = make_inputs(seqlen=6, ngroups=ngroups, D_shape="hp")
    kw = dict(D=extra["D"], dt_bias=extra["dt_bias"], dt_softplus=True, dt_limit=(0.1, 1.2))
    y_ref, final_ref = ssd_naive(**args, z=extra["z"], initial_states=extra["initial_states"],
                                 return_final_states=True, **kw)
    state = extra["initial_states"].clone()
    ys = [ssd_step_ref(state, args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t], args["C"][:, t],
                       z=extra["z"][:, t], **kw) for t in range(6)]
    assert_close(torch.stack(ys, 1), y_ref, 1e-12, "y")
    assert_close(state, final_ref, 1e-12, "state updated in place")


def test_public_ops_dispatch_to_reference_on_cpu():
    args, extra = make_inputs(seqlen=20)
    y = mamba_chunk_scan_combined(**args, chunk_size=8, **extra, dt_softplus=True, backend="auto")
    assert_close(y, ssd_naive(**args, **extra, dt_softplus=True), 1e-12, "auto")
    state = extra["initial_states"].clone()
    y1 = ssd_step(state, args["x"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0], args["C"][:, 0],
                  backend="reference")
    y1_ref = ssd_naive(**{k: (v[:, :1] if v.dim() > 1 else v) for k, v in args.items()},
                       initial_states=extra["initial_states"])[:, 0]
    assert_close(y1, y1_ref, 1e-12, "step")


def test_fused_backend_without_kernel_is_an_error():
    args, _ = make_inputs(seqlen=4)
    with pytest.raises(RuntimeError, match="backend='auto'"):
        mamba_chunk_scan_combined(**args, chunk_size=8, backend="fused")


@pytest.mark.parametrize("change, match", [
    (dict(B=torch.zeros(2, 17, 3, 5), C=torch.zeros(2, 17, 3, 5)), "ngroups=3 must divide nheads=4"),
    (dict(chunk_size=0), "chunk_size=0 must be a positive int"),
    (dict(dt=torch.zeros(2, 17, 3)), "dt must be"),
    (dict(A=torch.zeros(4, 5)), "A must be"),
    (dict(D=torch.zeros(5)), "D must be"),
    (dict(C=torch.zeros(2, 17, 1, 4)), "C must have B's shape"),
    (dict(initial_states=torch.zeros(2, 4, 3, 6)), "initial_states must be"),
    (dict(seq_idx=torch.zeros(2, 16, dtype=torch.int32)), "seq_idx must be"),
    (dict(x=torch.zeros(2, 17, 12)), "x must be"),
    (dict(backend="triton"), "backend="),
])
def test_bad_arguments_raise_value_errors_naming_them(change, match):
    args, _ = make_inputs(dtype=torch.float32)
    kw = {**args, "chunk_size": 16, **change}
    with pytest.raises(ValueError, match=match):
        mamba_chunk_scan_combined(**kw)
