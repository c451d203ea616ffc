"""The chunked selective scan reference against the token-by-token recurrence in float64, its
gradients (gradcheck, also through initial_state and the last state), and the op's argument checks."""
import pytest
import torch

from helpers import assert_close, randn, random_seq_idx
from kernels.selective_scan import selective_scan_fn
from kernels.selective_scan.reference import selective_scan_naive, selective_scan_ref

F64 = torch.float64


def scan_inputs(batch=2, dim=4, dstate=3, seqlen=17, groups=1, dtype=F64, seed=0, three_d_bc=False):
    """Seeded inputs in mamba_ssm's layout, with A < 0 as in Mamba (A = -exp(A_log))."""
    bc_shape = (batch, dstate, seqlen) if three_d_bc else (batch, groups, dstate, seqlen)
    return dict(
        u=randn(batch, dim, seqlen, seed=seed, dtype=dtype),
        delta=randn(batch, dim, seqlen, seed=seed + 1, dtype=dtype, scale=0.5),
        A=-torch.exp(randn(dim, dstate, seed=seed + 2, dtype=dtype, scale=0.5)),
        B=randn(*bc_shape, seed=seed + 3, dtype=dtype),
        C=randn(*bc_shape, seed=seed + 4, dtype=dtype),
        D=randn(dim, seed=seed + 5, dtype=dtype),
        z=randn(batch, dim, seqlen, seed=seed + 6, dtype=dtype),
        delta_bias=randn(dim, seed=seed + 7, dtype=dtype, scale=0.5),
        initial_state=randn(batch, dim, dstate, seed=seed + 8, dtype=dtype),
    )


VARIANTS = {
    # which optional pieces are passed; the rest are left at their defaults
    "bare": dict(keep=(), softplus=False, docs=False),
    "gated_with_state": dict(keep=("D", "z", "delta_bias", "initial_state"), softplus=True, docs=False),
    "skip_no_gate": dict(keep=("D",), softplus=True, docs=False),
    "documents_with_state": dict(keep=("D", "z", "delta_bias", "initial_state"), softplus=True, docs=True),
    "documents_bare": dict(keep=(), softplus=False, docs=True),
}
OPTIONAL = ("D", "z", "delta_bias", "initial_state")


def variant_kwargs(inputs, variant, seqlen, batch=2, seed=0):
    spec = VARIANTS[variant]
    kw = {k: v for k, v in inputs.items() if k not in OPTIONAL or k in spec["keep"]}
    kw["delta_softplus"] = spec["softplus"]
    if spec["docs"]:
        kw["seq_idx"] = random_seq_idx(batch, seqlen, min(3, seqlen), seed=seed + 9)
    return kw


@pytest.mark.parametrize("seqlen", [1, 63, 100])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_reference_matches_naive_loop_float64(seqlen, groups, variant):
    inputs = scan_inputs(seqlen=seqlen, groups=groups, seed=seqlen + groups)
    kw = variant_kwargs(inputs, variant, seqlen, seed=seqlen)
    out, last = selective_scan_ref(**kw, return_last_state=True)
    out_naive, last_naive = selective_scan_naive(**kw, return_last_state=True)
    assert_close(out, out_naive, 1e-12, "out")
    assert_close(last, last_naive, 1e-12, "last_state")


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64])
def test_every_chunk_size_gives_the_same_scan(chunk_size):
    inputs = scan_inputs(seqlen=41, groups=2, seed=3)
    kw = variant_kwargs(inputs, "documents_with_state", 41)
    out, last = selective_scan_ref(**kw, return_last_state=True, chunk_size=chunk_size)
    out_naive, last_naive = selective_scan_naive(**kw, return_last_state=True)
    assert_close(out, out_naive, 1e-12, "out")
    assert_close(last, last_naive, 1e-12, "last_state")


def test_three_dimensional_B_C_are_one_group():
    inputs = scan_inputs(seqlen=20, three_d_bc=True, seed=4)
    out = selective_scan_ref(**inputs, delta_softplus=True)
    grouped = dict(inputs, B=inputs["B"].unsqueeze(1), C=inputs["C"].unsqueeze(1))
    assert_close(out, selective_scan_naive(**grouped, delta_softplus=True), 1e-12, "3-D B, C")


def test_naive_loop_matches_the_recurrence_written_out():
    """The naive loop itself against the equations with explicit per-(b, d, n) scalar loops."""
    batch, dim, dstate, seqlen, groups = 1, 4, 2, 5, 2
    inputs = scan_inputs(batch, dim, dstate, seqlen, groups, seed=5)
    out = selective_scan_naive(**inputs, delta_softplus=True)
    u, A, B, C, D, z = (inputs[k] for k in ("u", "A", "B", "C", "D", "z"))
    dt = torch.nn.functional.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    expected = torch.zeros(batch, dim, seqlen, dtype=F64)
    for d in range(dim):
        g = d // (dim // groups)
        for n in range(dstate):
            h = inputs["initial_state"][0, d, n].item()
            for t in range(seqlen):
                h = torch.exp(dt[0, d, t] * A[d, n]).item() * h + (dt[0, d, t] * B[0, g, n, t] * u[0, d, t]).item()
                expected[0, d, t] += C[0, g, n, t].item() * h
    expected = (expected + D[:, None] * u) * z * torch.sigmoid(z)
    assert_close(out, expected, 1e-12, "naive vs scalar recurrence")


def test_packed_documents_equal_documents_run_separately():
    inputs = scan_inputs(batch=1, seqlen=30, groups=2, seed=6)
    seq_idx = torch.tensor([[0] * 7 + [1] * 16 + [2] * 7], dtype=torch.int32)
    out, last = selective_scan_ref(**inputs, delta_softplus=True, seq_idx=seq_idx, return_last_state=True,
                                   chunk_size=8)
    pieces = []
    for doc, (start, end) in enumerate([(0, 7), (7, 23), (23, 30)]):
        piece = {k: (v[..., start:end] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
        if doc > 0:
            piece.pop("initial_state")       # only the first document continues the initial state
        y, doc_last = selective_scan_ref(**piece, delta_softplus=True, return_last_state=True)
        pieces.append(y)
    assert_close(out, torch.cat(pieces, dim=-1), 1e-12, "packed out")
    assert_close(last, doc_last, 1e-12, "last state is the last document's")


@pytest.mark.parametrize("starts", [[8, 16], [1, 15], [7, 9, 23]])
def test_documents_starting_on_and_around_chunk_boundaries(starts):
    """Chunks of 8: a document starting exactly at a chunk start, just after one, or one token
    before the end of one must cut the carried state all the same."""
    seqlen = 24
    marks = torch.zeros(1, seqlen, dtype=torch.int32)
    marks[0, starts] = 1
    seq_idx = marks.cumsum(1, dtype=torch.int32)
    inputs = scan_inputs(batch=1, seqlen=seqlen, groups=2, seed=18)
    out, last = selective_scan_ref(**inputs, delta_softplus=True, seq_idx=seq_idx, return_last_state=True,
                                   chunk_size=8)
    out_naive, last_naive = selective_scan_naive(**inputs, delta_softplus=True, seq_idx=seq_idx,
                                                 return_last_state=True)
    assert_close(out, out_naive, 1e-12, "out")
    assert_close(last, last_naive, 1e-12, "last_state")


def test_last_state_continues_the_scan():
    inputs = scan_inputs(seqlen=50, groups=2, seed=7)
    full = selective_scan_ref(**inputs, delta_softplus=True)
    head = {k: (v[..., :19] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    tail = {k: (v[..., 19:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    y1, state = selective_scan_ref(**head, delta_softplus=True, return_last_state=True)
    y2 = selective_scan_ref(**dict(tail, initial_state=state), delta_softplus=True)
    assert_close(torch.cat([y1, y2], dim=-1), full, 1e-12, "continued scan")


def test_gradcheck_tiny_float64_with_initial_state_and_documents():
    inputs = scan_inputs(batch=1, dim=2, dstate=2, seqlen=6, groups=2, seed=8)
    names = list(inputs)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.int32)

    def f(*tensors):
        out, last = selective_scan_ref(**dict(zip(names, tensors)), delta_softplus=True,
                                       return_last_state=True, seq_idx=seq_idx, chunk_size=2)
        return out, last

    tensors = [t.clone().requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(f, tensors)
    # and without documents, where initial_state reaches every position
    g = lambda *ts: selective_scan_ref(**dict(zip(names, ts)), delta_softplus=True,  # noqa: E731
                                       return_last_state=True, chunk_size=4)
    assert torch.autograd.gradcheck(g, tensors)


@pytest.mark.parametrize("seqlen", [1, 37])
def test_gradients_through_output_and_last_state_match_naive(seqlen):
    inputs = scan_inputs(seqlen=seqlen, groups=2, seed=9)
    seq_idx = random_seq_idx(2, seqlen, min(3, seqlen), seed=10)
    w_out, w_last = randn(2, 4, seqlen, seed=11, dtype=F64), randn(2, 4, 3, seed=12, dtype=F64)
    grads = []
    for scan in (selective_scan_ref, selective_scan_naive):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out, last = scan(**leaves, delta_softplus=True, return_last_state=True, seq_idx=seq_idx)
        ((out * w_out).sum() + (last * w_last).sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in inputs:
        assert_close(grads[0][k], grads[1][k], 1e-11, f"grad {k}")


def test_gradient_flows_from_last_state_alone_to_initial_state():
    inputs = scan_inputs(seqlen=12, seed=13)
    h0 = inputs.pop("initial_state").requires_grad_()
    _, last = selective_scan_ref(**inputs, initial_state=h0, delta_softplus=True, return_last_state=True)
    last.sum().backward()
    # d last / d h0 is the product of the decays: exp(sum_t dt_t A), elementwise
    dt = torch.nn.functional.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    expected = torch.exp(dt.sum(-1, keepdim=True) * inputs["A"])
    assert_close(h0.grad, expected, 1e-12, "d last_state / d initial_state")


def test_float32_reference_matches_float64_naive_and_large_decays_stay_finite():
    inputs = scan_inputs(seqlen=70, groups=2, seed=14)
    # steps of dt * A down to about -200: a cumulative sum over a chunk would overflow exp(-cum)
    inputs["delta"] = inputs["delta"].abs() * 20
    expected = selective_scan_naive(**inputs, delta_softplus=True)
    f32 = {k: v.float().requires_grad_() for k, v in inputs.items()}
    out, last = selective_scan_ref(**f32, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert_close(out, expected, 1e-5, "fp32 vs fp64")
    (out.sum() + last.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in f32.values())


def test_low_precision_input_gives_output_in_its_dtype_and_fp32_state():
    inputs = {k: v.to(torch.bfloat16) for k, v in scan_inputs(seqlen=9, seed=15).items()}
    inputs["initial_state"] = inputs["initial_state"].float()
    out, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32


def test_public_op_equals_reference():
    inputs = scan_inputs(seqlen=33, groups=2, seed=16)
    seq_idx = random_seq_idx(2, 33, 2, seed=17)
    got = selective_scan_fn(**inputs, delta_softplus=True, seq_idx=seq_idx, return_last_state=True)
    ref = selective_scan_naive(**inputs, delta_softplus=True, seq_idx=seq_idx, return_last_state=True)
    assert_close(got[0], ref[0], 1e-12, "out")
    assert_close(got[1], ref[1], 1e-12, "last")


@pytest.mark.parametrize("change, match", [
    (dict(u=torch.zeros(2, 4)), "u must be"),
    (dict(delta=torch.zeros(2, 4, 5)), "delta must"),
    (dict(A=torch.zeros(3, 3)), "A must be"),
    (dict(A=torch.zeros(4, 3, dtype=torch.complex64)), "real"),
    (dict(B=torch.zeros(2, 3, 3, 17), C=torch.zeros(2, 3, 3, 17)), "groups=3, which must divide dim=4"),
    (dict(B=torch.zeros(2, 1, 5, 17)), "B must be"),
    (dict(C=torch.zeros(2, 2, 3, 17)), "same number of groups"),
    (dict(D=torch.zeros(5)), "D must be"),
    (dict(delta_bias=torch.zeros(2)), "delta_bias must be"),
    (dict(z=torch.zeros(2, 4, 3)), "z must"),
    (dict(initial_state=torch.zeros(2, 4, 2)), "initial_state must be"),
    (dict(seq_idx=torch.zeros(2, 17, dtype=torch.int64)), "int32"),
    (dict(seq_idx=torch.zeros(2, 16, dtype=torch.int32)), "seq_idx must be"),
])
def test_bad_arguments_name_the_argument(change, match):
    inputs = dict(scan_inputs(seqlen=17, dtype=torch.float32), **change)
    with pytest.raises(ValueError, match=match):
        selective_scan_fn(**inputs)


def test_unknown_backend_and_unavailable_fused_backend_are_errors(monkeypatch):
    inputs = scan_inputs(seqlen=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        selective_scan_fn(**inputs, backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="auto"):
            selective_scan_fn(**inputs, backend="fused")
    monkeypatch.setenv("HYBRID_ZOO_KERNELS", "reference")
    assert_close(selective_scan_fn(**inputs), selective_scan_ref(**inputs), 0.0, "env reference")
