"""Mamba-2 layer: wiring against a hand-written float64 composition of the definitions, parity with
transformers' Mamba2Mixer, state continuation, packed documents, init, and argument checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, randn, random_seq_idx, rel_err, run_documents_separately, run_in_pieces

from kernels.ssd.reference import ssd_naive
from layers.mamba2 import Mamba2, Mamba2State

TINY = dict(d_model=16, d_state=8, headdim=8, ngroups=2, chunk_size=16)   # d_inner 32, nheads 4


def make_layer(seed=0, dtype=torch.float32, scale=0.5, **kw):
    """A tiny layer with weights re-drawn at larger scales, so every output depends visibly on
    context (the default init makes the layer nearly memoryless at these sizes)."""
    torch.manual_seed(seed)
    layer = Mamba2(**{**TINY, **kw}, dtype=dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name in ("A_log", "dt_bias"):
                p.uniform_(-1.0, 0.5)         # decays of 0.2-0.9 per step: long enough memory
            else:
                p.normal_(0.0, scale)
    return layer


def naive_forward(layer: Mamba2, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """mamba_ssm's Mamba2 forward written out from its definition in float64, loop by loop."""
    P = {k: v.detach().double() for k, v in layer.named_parameters()}
    x = x.double()
    batch, seqlen, _ = x.shape
    h, p, g, n, w = layer.nheads, layer.headdim, layer.ngroups, layer.d_state, layer.d_conv
    d_ssm = h * p
    proj = x @ P["in_proj.weight"].T + P.get("in_proj.bias", 0)
    d_mlp = (proj.shape[-1] - 2 * d_ssm - 2 * g * n - h) // 2
    z0, x0, z, xbc, dt = proj.split([d_mlp, d_mlp, d_ssm, d_ssm + 2 * g * n, h], dim=-1)
    conv = torch.zeros_like(xbc)
    for t in range(seqlen):
        for k in range(w):
            src = t - (w - 1) + k
            if src < 0:
                continue
            same = 1.0 if seq_idx is None else (seq_idx[:, src] == seq_idx[:, t]).double().unsqueeze(-1)
            conv[:, t] += P["conv1d.weight"][:, 0, k] * xbc[:, src] * same
    conv = F.silu(conv + P.get("conv1d.bias", 0))
    xs, B, C = conv.split([d_ssm, g * n, g * n], dim=-1)
    D = P["D"].view(h, p) if P["D"].numel() == d_ssm else P["D"]
    y = ssd_naive(xs.view(batch, seqlen, h, p), dt, -torch.exp(P["A_log"]), B.view(batch, seqlen, g, n),
                  C.view(batch, seqlen, g, n), D=D, z=None if layer.rmsnorm else z.view(batch, seqlen, h, p),
                  dt_bias=P["dt_bias"], dt_softplus=True, dt_limit=layer.dt_limit, seq_idx=seq_idx)
    y = y.reshape(batch, seqlen, d_ssm)
    if layer.rmsnorm:
        if not layer.norm_before_gate:
            y = y * F.silu(z)
        yg = y.view(batch, seqlen, g, d_ssm // g)
        y = (yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + layer.norm.eps)).reshape(batch, seqlen, d_ssm)
        y = y * P["norm.weight"]
        if layer.norm_before_gate:
            y = y * F.silu(z)
    if d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return y @ P["out_proj.weight"].T + P.get("out_proj.bias", 0)


VARIANTS = {
    "default": {},
    "mlp_branch": dict(d_ssm=16),
    "no_rmsnorm_D_per_channel": dict(rmsnorm=False, D_has_hdim=True),
    "norm_before_gate_biases_dt_limit": dict(norm_before_gate=True, bias=True, dt_limit=(0.05, 0.5)),
    "one_group_width2_conv": dict(ngroups=1, d_conv=2),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_float64_definition(variant):
    layer = make_layer(dtype=torch.float64, **VARIANTS[variant])
    x = randn(2, 21, 16, seed=1, dtype=torch.float64)
    # 1e-6, not 1e-12: the conv and norm references compute in float32 even for float64 inputs
    assert_close(layer(x), naive_forward(layer, x), 1e-6, variant)


def test_packed_forward_matches_float64_definition():
    layer = make_layer(dtype=torch.float64, d_ssm=16)
    x = randn(2, 40, 16, seed=2, dtype=torch.float64)
    seq_idx = random_seq_idx(2, 40, 4, seed=2)
    assert_close(layer(x, seq_idx=seq_idx), naive_forward(layer, x, seq_idx), 1e-6, "packed")


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_token_by_token_matches_full_forward(variant):
    layer = make_layer(**VARIANTS[variant])
    x = randn(2, 20, 16, seed=3)
    y_full = layer(x)
    y_steps = run_in_pieces(layer, x, cuts=list(range(1, 20)))
    assert_close(y_steps, y_full, 1e-5, "decode")


@pytest.mark.parametrize("cuts", [[5], [16, 32], [7, 30, 31, 32, 40]], ids=str)
def test_chunked_prefill_then_decode_matches_full_forward(cuts):
    layer = make_layer(d_ssm=16)
    x = randn(2, 45, 16, seed=4)
    assert_close(run_in_pieces(layer, x, cuts), layer(x), 1e-5, f"pieces {cuts}")


def test_bfloat16_layer_decode_matches_full_forward():
    layer = make_layer(dtype=torch.bfloat16)
    x = randn(2, 24, 16, seed=11, dtype=torch.bfloat16)
    y_full = layer(x)
    assert y_full.dtype == torch.bfloat16
    state = layer.init_state(2)
    assert state.conv_state.dtype == torch.bfloat16 and state.ssm_state.dtype == torch.float32
    assert_close(run_in_pieces(layer, x, cuts=[10] + list(range(11, 24))), y_full, 2e-2, "bf16 decode")


def test_state_is_updated_in_place_and_has_documented_shapes():
    layer = make_layer()
    state = layer.init_state(3)
    assert isinstance(state, Mamba2State)
    assert state.conv_state.shape == (3, layer.conv_dim, layer.d_conv - 1)
    assert state.ssm_state.shape == (3, layer.nheads, layer.headdim, layer.d_state)
    assert state.ssm_state.dtype == torch.float32
    conv_buf, ssm_buf = state.conv_state, state.ssm_state
    layer(randn(3, 5, 16, seed=5), state=state)
    assert state.conv_state is conv_buf and state.ssm_state is ssm_buf
    assert ssm_buf.abs().sum() > 0 and conv_buf.abs().sum() > 0


def test_packed_documents_match_documents_run_alone():
    layer = make_layer(d_ssm=16)
    x = randn(2, 40, 16, seed=6)
    seq_idx = random_seq_idx(2, 40, 3, seed=6)
    y_packed = layer(x, seq_idx=seq_idx)
    assert_close(y_packed, run_documents_separately(layer, x, seq_idx), 1e-5, "packed")
    # and the documents really would interact without seq_idx (so the check above means something)
    assert rel_err(layer(x), y_packed) > 1e-2


def test_continuing_a_packed_row_matches_one_call():
    layer = make_layer()
    x = randn(1, 36, 16, seed=7)
    seq_idx = torch.tensor([[0] * 10 + [1] * 17 + [2] * 9], dtype=torch.int32)
    y_full = layer(x, seq_idx=seq_idx)
    state = layer.init_state(1)
    pieces = [(0, 12), (12, 13), (13, 30), (30, 36)]       # cuts inside documents and next to a start
    y = torch.cat([layer(x[:, a:b], state=state, seq_idx=seq_idx[:, a:b]) for a, b in pieces], dim=1)
    assert_close(y, y_full, 1e-5, "packed continuation")


def test_matches_transformers_mamba2_mixer():
    import transformers
    from transformers import Mamba2Config
    if tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 24):
        # Seen on the GPU machine's image: transformers 5.17's Mamba2Mixer gives a different output
        # (relative error 0.5) for this n_groups=2 config; parity is established against 5.24, what
        # the test extra installs.
        pytest.skip(f"transformers {transformers.__version__} < 5.24: its Mamba2Mixer is not the reference here")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = Mamba2Config(num_heads=4, head_dim=8, hidden_size=16, state_size=8, expand=2, n_groups=2,
                       conv_kernel=4, chunk_size=16, use_bias=False, use_conv_bias=True,
                       num_hidden_layers=1, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    hf = Mamba2Mixer(cfg, 0).eval()
    layer = make_layer(seed=1)
    hf.load_state_dict(layer.state_dict())          # same parameter names and shapes
    x = randn(2, 37, 16, seed=8)
    with torch.no_grad():
        assert_close(layer(x), hf(x), 1e-5, "transformers Mamba2Mixer")


def test_gradients_reach_every_parameter():
    layer = make_layer(d_ssm=16, bias=True)
    layer(randn(2, 19, 16, seed=9)).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_names_and_shapes_follow_mamba_ssm():
    layer = Mamba2(d_model=16, d_state=8, headdim=8, ngroups=3, d_ssm=24, D_has_hdim=True)
    conv_dim = 24 + 2 * 3 * 8
    shapes = {k: tuple(v.shape) for k, v in layer.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * 32 + 2 * 3 * 8 + 3, 16), "conv1d.weight": (conv_dim, 1, 4),
        "conv1d.bias": (conv_dim,), "dt_bias": (3,), "A_log": (3,), "D": (24,), "norm.weight": (24,),
        "out_proj.weight": (16, 32)}
    assert layer.norm.group_size == 8


def test_init_follows_documented_ranges():
    layer = Mamba2(d_model=64, d_state=4, headdim=4, dt_min=2e-3, dt_max=0.05, A_init_range=(2, 8))
    A = torch.exp(layer.A_log.detach())
    dt = F.softplus(layer.dt_bias.detach())
    assert ((A >= 2 - 1e-5) & (A <= 8 + 1e-5)).all() and A.std() > 0
    assert ((dt >= 2e-3 * (1 - 1e-4)) & (dt <= 0.05 * (1 + 1e-4))).all()
    assert (math.log(dt.max() / dt.min())) > 1.0                       # spread log-uniformly, not constant
    assert torch.equal(layer.D.detach(), torch.ones(32)) and torch.equal(layer.norm.weight.detach(), torch.ones(128))
    assert all(getattr(p, "_no_weight_decay", False) for p in (layer.A_log, layer.D, layer.dt_bias))
    assert not getattr(layer.in_proj.weight, "_no_weight_decay", False)


def test_numbers_written_as_yaml_strings_are_accepted():
    layer = Mamba2(**TINY, dt_min="1e-3", dt_max="1e-1", A_init_range=["1", "4"], dt_limit=[0, "inf"])
    assert layer.dt_limit == (0.0, float("inf")) and layer.A_init_range == (1.0, 4.0)
    dt = F.softplus(layer.dt_bias.detach())
    assert ((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4))).all()


def test_meta_build_then_reset_parameters_gives_a_working_layer():
    layer = Mamba2(**TINY, device="meta")
    assert layer.A_log.is_meta
    layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    assert torch.equal(layer.D.detach(), torch.ones(layer.nheads))
    assert getattr(layer.A_log, "_no_weight_decay", False)
    x = randn(1, 9, 16, seed=10)
    assert_close(layer(x), naive_forward(layer, x).float(), 1e-5, "materialised layer")


@pytest.mark.parametrize("kw, match", [
    (dict(headdim=12), "d_ssm=32 .* must be a multiple of headdim=12"),
    (dict(ngroups=3), "ngroups=3 must divide nheads"),
    (dict(d_ssm=40), "d_ssm=40 must be a positive integer <= d_inner"),
    (dict(d_ssm=20), "multiple of headdim=8"),
    (dict(expand=1.3), "expand=1.3"),
    (dict(d_state=0), "d_state=0 must be a positive integer"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(A_init_range=(0, 4)), "A_init_range"),
    (dict(A_init_range=(4,)), "A_init_range"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min <= dt_max"),
    (dict(dt_limit=(1.0, 0.5)), "dt_limit"),
    (dict(dt_min="small"), "dt_min='small' must be a number"),
    (dict(backend="cuda"), "backend="),
])
def test_bad_arguments_raise_value_errors_naming_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba2(**{**TINY, **kw})


def test_bad_inputs_raise_value_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match="d_model=16"):
        layer(torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="init_state\\(2\\)"):
        layer(torch.zeros(2, 3, 16), state=layer.init_state(1))
