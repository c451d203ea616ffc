"""The Mamba-1 layer: parameter names and init as in mamba_ssm, state continuation for any number of
tokens == the full forward, packed documents == documents run alone, Jamba / Falcon Mamba inner
norms, parity with transformers' mixers, and argument checks."""
import math

import pytest
import torch

from helpers import (assert_close, randn, random_seq_idx, run_documents_separately, run_in_pieces,
                     scramble_mamba)
from layers.mamba import Mamba, MambaState

D_MODEL = 16


def make(seed=0, dtype=torch.float32, **kw) -> Mamba:
    torch.manual_seed(seed)
    kw = dict(dict(d_state=4, d_conv=4, expand=2), **kw)
    return scramble_mamba(Mamba(D_MODEL, dtype=dtype, **kw), seed)


def test_parameter_names_and_shapes_follow_mamba_ssm():
    layer = Mamba(48, d_state=8, d_conv=3, expand=2)
    d_inner, dt_rank = 96, math.ceil(48 / 16)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner, 48),
        "conv1d.weight": (d_inner, 1, 3),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * 8, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, 8),
        "D": (d_inner,),
        "out_proj.weight": (48, d_inner),
    }
    with_bias = {n for n, _ in Mamba(48, bias=True, conv_bias=False).named_parameters()}
    assert {"in_proj.bias", "out_proj.bias"} <= with_bias and "conv1d.bias" not in with_bias


def test_inner_norms_learned_have_weights_and_weightless_have_none():
    jamba = {n: tuple(p.shape) for n, p in Mamba(32, d_state=4, inner_norms="learned").named_parameters()}
    assert jamba["dt_layernorm.weight"] == (2,) and jamba["b_layernorm.weight"] == (4,)
    assert jamba["c_layernorm.weight"] == (4,)
    falcon = Mamba(32, d_state=4, inner_norms="weightless")
    assert not any("layernorm" in n for n, _ in falcon.named_parameters())
    assert {n for n, _ in falcon.named_parameters()} == {n for n, _ in Mamba(32, d_state=4).named_parameters()}
    x = randn(2, 7, 32, seed=1)
    for layer in (Mamba(32, d_state=4, inner_norms="learned"), falcon):
        y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_inner_norms_normalise_dt_B_C_after_x_proj():
    """With weightless norms, scaling x_proj's rows for dt, B and C changes nothing (the norm undoes
    it), while without norms it does: the norms sit exactly between x_proj and their uses."""
    x = randn(1, 9, D_MODEL, seed=2)
    for norms, should_change in (("weightless", False), (None, True)):
        layer = make(inner_norms=norms)
        y = layer(x)
        with torch.no_grad():
            layer.x_proj.weight.mul_(3.0)
        changed = (layer(x) - y).abs().max().item() > 1e-4
        assert changed == should_change, norms


def test_init_follows_the_documented_distributions():
    torch.manual_seed(0)
    layer = Mamba(64, d_state=6, dt_min=0.002, dt_max=0.05, dt_scale=2.0)
    d_inner, dt_rank = 128, 4
    expected_A_log = torch.log(torch.arange(1, 7, dtype=torch.float32)).expand(d_inner, 6)
    assert torch.equal(layer.A_log.detach(), expected_A_log)
    assert torch.equal(layer.D.detach(), torch.ones(d_inner))
    dt = torch.nn.functional.softplus(layer.dt_proj.bias.detach().double())
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    # log-uniform: the mean of log(dt) is near the middle of [log dt_min, log dt_max]
    assert abs(dt.log().mean().item() - (math.log(0.002) + math.log(0.05)) / 2) < 0.3
    s = dt_rank ** -0.5 * 2.0
    w = layer.dt_proj.weight.detach()
    assert w.abs().max() <= s and w.abs().max() > 0.8 * s
    constant = Mamba(64, dt_init="constant", dt_scale=2.0).dt_proj.weight.detach()
    assert torch.equal(constant, torch.full_like(constant, s))
    floored = torch.nn.functional.softplus(Mamba(16, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3).dt_proj.bias)
    assert torch.allclose(floored, torch.full_like(floored, 1e-3), rtol=1e-4)
    for p in (layer.A_log, layer.D, layer.dt_proj.bias):
        assert p._no_weight_decay is True
    assert not getattr(layer.in_proj.weight, "_no_weight_decay", False)


def test_meta_build_then_reset_parameters_materialises_the_init():
    layer = Mamba(32, d_state=4, inner_norms="learned", device="meta")
    assert layer.A_log.is_meta
    layer = layer.to_empty(device="cpu")
    # the trainer's and the model init's flags survive materialisation (torch drops them otherwise)
    assert all(getattr(p, "_no_weight_decay", False) for p in (layer.A_log, layer.D, layer.dt_proj.bias))
    layer.reset_parameters()
    assert torch.equal(layer.A_log.detach(), torch.log(torch.arange(1, 5, dtype=torch.float32)).expand(64, 4))
    assert torch.equal(layer.dt_layernorm.weight.detach(), torch.ones(2))
    assert torch.isfinite(layer(randn(1, 3, 32))).all()


@pytest.mark.parametrize("inner_norms", [None, "learned", "weightless"])
def test_token_by_token_decode_matches_full_forward(inner_norms):
    layer = make(inner_norms=inner_norms, seed=3)
    x = randn(2, 21, D_MODEL, seed=4)
    with torch.no_grad():
        full = layer(x)
        stepped = run_in_pieces(layer, x, cuts=list(range(1, 21)))
    assert_close(stepped, full, 1e-5, "decode vs full")


@pytest.mark.parametrize("cuts", [[13], [6, 19, 20, 21], [1, 2, 30]])
def test_chunked_prefill_then_decode_matches_full_forward(cuts):
    layer = make(seed=5, d_conv=3)
    x = randn(2, 34, D_MODEL, seed=6)
    with torch.no_grad():
        assert_close(run_in_pieces(layer, x, cuts=cuts), layer(x), 1e-5, f"pieces at {cuts}")


def test_multi_token_continuation_does_not_restart_the_state():
    """A second multi-token call must see the first call's tokens: its output differs from the same
    tokens run from a fresh state (transformers' Mamba restarts here) and equals the full forward."""
    layer = make(seed=7)
    x = randn(1, 24, D_MODEL, seed=8)
    state = layer.init_state(1)
    with torch.no_grad():
        layer(x[:, :12], state=state)
        continued = layer(x[:, 12:], state=state)
        fresh = layer(x[:, 12:])
        full = layer(x)
    assert_close(continued, full[:, 12:], 1e-5, "continued")
    assert (continued - fresh).norm() > 1e-2 * fresh.norm()


def test_float64_layer_continues_its_state_exactly():
    layer = make(seed=9, dtype=torch.float64)
    x = randn(2, 15, D_MODEL, seed=10, dtype=torch.float64)
    state = layer.init_state(2)
    assert state.ssm_state.dtype == torch.float64
    with torch.no_grad():
        assert_close(run_in_pieces(layer, x, cuts=[4, 5, 11]), layer(x), 1e-12, "fp64 pieces")


def test_packed_documents_match_documents_run_separately():
    layer = make(seed=11, inner_norms="learned")
    x = randn(2, 40, D_MODEL, seed=12)
    seq_idx = random_seq_idx(2, 40, 4, seed=13)
    with torch.no_grad():
        packed = layer(x, seq_idx=seq_idx)
        alone = run_documents_separately(layer, x, seq_idx)
    assert_close(packed, alone, 1e-5, "packed vs separate")


def test_packed_documents_continue_in_pieces():
    """Prefill and decode with seq_idx: a state carries the last document into the next call."""
    layer = make(seed=14)
    x = randn(2, 30, D_MODEL, seed=15)
    seq_idx = random_seq_idx(2, 30, 3, seed=16)
    state = layer.init_state(2)
    outs, start = [], 0
    with torch.no_grad():
        full = layer(x, seq_idx=seq_idx)
        for end in (9, 10, 22, 30):
            outs.append(layer(x[:, start:end], state=state, seq_idx=seq_idx[:, start:end]))
            start = end
    assert_close(torch.cat(outs, dim=1), full, 1e-5, "packed pieces")


def test_state_is_updated_in_place_and_has_documented_shapes():
    layer = make(seed=17)
    state = layer.init_state(3)
    assert isinstance(state, MambaState)
    assert state.conv_state.shape == (3, 32, 3) and state.ssm_state.shape == (3, 32, 4)
    assert state.ssm_state.dtype == torch.float32
    conv, ssm = state.conv_state, state.ssm_state
    with torch.no_grad():
        layer(randn(3, 5, D_MODEL, seed=18), state=state)
    assert state.conv_state is conv and state.ssm_state is ssm
    assert conv.abs().sum() > 0 and ssm.abs().sum() > 0


@pytest.mark.parametrize("variant", ["mamba", "falcon_mamba", "jamba"])
def test_matches_transformers_mixer(variant):
    """Parity with transformers' own mixers (their PyTorch fallback), weights loaded by name."""
    import transformers   # a test dependency (pyproject [test]): fail loudly rather than skip
    common = dict(hidden_size=D_MODEL, num_hidden_layers=1)
    if variant == "mamba":
        from transformers.models.mamba.modeling_mamba import MambaMixer as Mixer
        config = transformers.MambaConfig(state_size=4, intermediate_size=32, conv_kernel=4,
                                          time_step_rank=3, **common)
        ours, extra = make(seed=19, dt_rank=3), {}
    elif variant == "falcon_mamba":
        from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaMixer as Mixer
        config = transformers.FalconMambaConfig(state_size=4, intermediate_size=32, conv_kernel=4,
                                                time_step_rank=3, mixer_rms_eps=1e-6, **common)
        # its own init touches norm weights it does not have; the weights are loaded below anyway
        ours, extra = make(seed=20, dt_rank=3, inner_norms="weightless"), {"initialize_mixer_weights": False}
    else:
        from transformers.models.jamba.modeling_jamba import JambaMambaMixer as Mixer
        config = transformers.JambaConfig(mamba_d_state=4, mamba_expand=2, mamba_d_conv=4, mamba_dt_rank=3,
                                          rms_norm_eps=1e-6, **common)
        ours, extra = make(seed=21, dt_rank=3, inner_norms="learned"), {}
    theirs = Mixer(config, layer_idx=0, **extra).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = randn(2, 11, D_MODEL, seed=22)
    with torch.no_grad():
        expected = theirs(x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        assert_close(ours(x), expected, 1e-5, variant)


def test_gradients_reach_every_parameter():
    layer = make(seed=23, inner_norms="learned")
    x = randn(2, 10, D_MODEL, seed=24).requires_grad_()
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_bfloat16_layer_runs_and_keeps_a_float32_ssm_state():
    layer = make(seed=27, dtype=torch.bfloat16)
    x = randn(2, 6, D_MODEL, seed=28, dtype=torch.bfloat16)
    state = layer.init_state(2)
    y = layer(x, state=state)
    assert y.dtype == torch.bfloat16 and state.ssm_state.dtype == torch.float32
    assert state.conv_state.dtype == torch.bfloat16
    assert_close(y.float(), make(seed=27)(x.float()), 5e-2, "bf16 vs fp32")


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=0), "d_model"),
    (dict(d_model=16, d_state=2.5), "d_state"),
    (dict(d_model=16, d_conv=0), "d_conv"),
    (dict(d_model=16, expand=0), "expand"),
    (dict(d_model=15, expand=1.5), "expand"),
    (dict(d_model=16, dt_rank=0), "dt_rank"),
    (dict(d_model=16, dt_rank="big"), "dt_rank"),
    (dict(d_model=16, dt_min=0.1, dt_max=0.01), "dt_min"),
    (dict(d_model=16, dt_init="normal"), "dt_init"),
    (dict(d_model=16, dt_scale=0), "dt_scale"),
    (dict(d_model=16, dt_init_floor=-1), "dt_init_floor"),
    (dict(d_model=16, inner_norms="jamba"), "inner_norms"),
    (dict(d_model=16, norm_eps=0), "norm_eps"),
    (dict(d_model=16, backend="cuda"), "backend"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba(**kwargs)


def test_bad_inputs_name_the_fix():
    layer = Mamba(D_MODEL, d_state=4)
    with pytest.raises(ValueError, match="d_model=16"):
        layer(randn(2, 5, 8))
    with pytest.raises(ValueError, match="batch, seqlen, d_model"):
        layer(randn(5, D_MODEL))
    with pytest.raises(ValueError, match=r"init_state\(2\)"):
        layer(randn(2, 5, D_MODEL), state=layer.init_state(3))
    with pytest.raises(ValueError, match="int32"):
        layer(randn(2, 5, D_MODEL), seq_idx=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch_size"):
        layer.init_state(0)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
@pytest.mark.parametrize("inner_norms", [None, "learned"])
def test_cuda_layer_matches_cpu_reference_outputs_and_gradients(inner_norms):
    """On CUDA the layer takes the fused scan when it is built (backend auto); it must agree with
    the CPU reference on outputs, packed documents and every parameter gradient."""
    cpu = make(seed=29, inner_norms=inner_norms)
    gpu = make(seed=29, inner_norms=inner_norms).cuda()
    x = randn(3, 200, D_MODEL, seed=30)
    seq_idx = random_seq_idx(3, 200, 3, seed=31)
    for sid in (None, seq_idx):
        cpu.zero_grad(), gpu.zero_grad()
        y_cpu = cpu(x, seq_idx=sid)
        y_gpu = gpu(x.cuda(), seq_idx=None if sid is None else sid.cuda())
        assert_close(y_gpu.cpu(), y_cpu, 1e-4, "cuda vs cpu output")
        y_cpu.square().sum().backward()
        y_gpu.square().sum().backward()
        for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
            assert_close(p_gpu.grad.cpu(), p_cpu.grad, 1e-3, f"grad {name}")


@requires_cuda
def test_cuda_decode_and_chunked_prefill_match_full_forward():
    layer = make(seed=32).cuda()
    x = randn(2, 40, D_MODEL, seed=33).cuda()
    with torch.no_grad():
        full = layer(x)
        assert_close(run_in_pieces(layer, x, cuts=[17] + list(range(18, 40))), full, 1e-4, "cuda pieces")


@requires_cuda
def test_cuda_bfloat16_layer_tracks_float32():
    layer32 = make(seed=34).cuda()
    layer16 = make(seed=34, dtype=torch.bfloat16).cuda()
    x = randn(2, 64, D_MODEL, seed=35).cuda()
    with torch.no_grad():
        assert_close(layer16(x.bfloat16()).float(), layer32(x), 5e-2, "bf16 vs fp32 on cuda")


@requires_cuda
def test_cuda_layer_uses_the_fused_scan_exactly_when_it_is_built(monkeypatch):
    from kernels.selective_scan import fused

    monkeypatch.delenv("HYBRID_ZOO_KERNELS", raising=False)    # backend "auto"
    calls = []
    original = fused.selective_scan_fn
    monkeypatch.setattr(fused, "selective_scan_fn", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = randn(1, 8, D_MODEL, seed=36).cuda()
    make(seed=37).cuda()(x)
    assert bool(calls) == fused.available()
    calls.clear()
    make(seed=37, backend="reference").cuda()(x)
    assert not calls
