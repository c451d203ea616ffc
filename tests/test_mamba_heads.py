"""Zamba's multi-head Mamba-1 (layers.mamba.Mamba with n_heads > 1): per-head x_proj / dt_proj and
per-head B, C; parameter shapes as transformers' ZambaMambaMixer, parity with it, state continuation
== full forward, packed documents == documents run alone, a head reads only its own channels, and
the no-weight-decay flags."""
import pytest
import torch

from helpers import (assert_close, randn, random_seq_idx, run_documents_separately, run_in_pieces,
                     scramble_mamba)
from layers.mamba import Mamba

D_MODEL = 16


def make(seed=0, dtype=torch.float32, **kw) -> Mamba:
    torch.manual_seed(seed)
    kw = dict(dict(d_state=4, d_conv=4, expand=2, dt_rank=3, n_heads=2), **kw)
    return scramble_mamba(Mamba(D_MODEL, dtype=dtype, **kw), seed)


def test_parameter_names_and_shapes_follow_transformers_zamba_mixer():
    layer = Mamba(48, d_state=8, d_conv=3, expand=2, dt_rank=5, n_heads=4)
    d_inner, headdim = 96, 24
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner, 48),
        "conv1d.weight": (d_inner, 1, 3),
        "conv1d.bias": (d_inner,),
        "x_proj_weight": (4, 5 + 2 * 8, headdim),
        "dt_proj_weight": (4, headdim, 5),
        "dt_proj_bias": (4, headdim),
        "A_log": (d_inner, 8),
        "D": (d_inner,),
        "out_proj.weight": (48, d_inner),
    }
    assert layer.headdim == headdim and "n_heads=4" in repr(layer)


def test_one_head_is_the_default_layer():
    torch.manual_seed(1)
    default = Mamba(D_MODEL, d_state=4)
    torch.manual_seed(1)
    one = Mamba(D_MODEL, d_state=4, n_heads=1)
    assert default.state_dict().keys() == one.state_dict().keys()
    for key, value in default.state_dict().items():
        assert torch.equal(value, one.state_dict()[key]), key


def test_init_follows_the_documented_distributions_per_head():
    torch.manual_seed(0)
    layer = Mamba(64, d_state=6, dt_rank=4, dt_min=0.002, dt_max=0.05, dt_scale=2.0, n_heads=4)
    headdim = 32
    dt = torch.nn.functional.softplus(layer.dt_proj_bias.detach().double())
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert dt.std() > 0                                     # drawn per channel, not one value per head
    s = 4 ** -0.5 * 2.0
    w = layer.dt_proj_weight.detach()
    assert w.abs().max() <= s and w.abs().max() > 0.8 * s
    x_w = layer.x_proj_weight.detach()
    assert x_w.abs().max() <= headdim ** -0.5 and x_w.abs().max() > 0.8 * headdim ** -0.5
    assert torch.equal(layer.A_log.detach(), torch.log(torch.arange(1, 7, dtype=torch.float32)).expand(128, 6))
    assert torch.equal(layer.D.detach(), torch.ones(128))
    constant = Mamba(64, dt_rank=4, dt_init="constant", dt_scale=2.0, n_heads=4).dt_proj_weight.detach()
    assert torch.equal(constant, torch.full_like(constant, s))


def test_no_weight_decay_flags_cover_the_per_head_dt_bias_and_survive_meta():
    materialised = Mamba(32, d_state=4, n_heads=2, device="meta").to_empty(device="cpu")
    for layer in (Mamba(32, d_state=4, n_heads=2), materialised):
        flagged = {n for n, p in layer.named_parameters() if getattr(p, "_no_weight_decay", False)}
        assert flagged == {"A_log", "D", "dt_proj_bias"}
    layer.reset_parameters()
    assert torch.isfinite(layer(randn(1, 3, 32))).all()


def test_each_head_reads_only_its_own_channels():
    """Block-diagonal x_proj / dt_proj: changing head 1's conv input channels leaves head 0's scan
    output unchanged (and changes head 1's)."""
    layer = make(seed=1)
    xs, z = randn(2, 9, 32, seed=2), randn(2, 9, 32, seed=3)
    moved = xs.clone()
    moved[..., 16:] += randn(2, 9, 16, seed=4)
    with torch.no_grad():
        y, y_moved = layer.ssm(xs, z), layer.ssm(moved, z)
    assert_close(y_moved[..., :16], y[..., :16], 1e-6, "head 0")
    assert (y_moved[..., 16:] - y[..., 16:]).norm() > 1e-2 * y[..., 16:].norm()


@pytest.mark.parametrize("inner_norms", [None, "learned"])
def test_token_by_token_decode_matches_full_forward(inner_norms):
    layer = make(seed=3, inner_norms=inner_norms)
    x = randn(2, 19, D_MODEL, seed=4)
    with torch.no_grad():
        assert_close(run_in_pieces(layer, x, cuts=list(range(1, 19))), layer(x), 1e-5, "decode vs full")


def test_chunked_prefill_then_decode_matches_full_forward():
    layer = make(seed=5, n_heads=4, d_conv=3)
    x = randn(2, 30, D_MODEL, seed=6)
    with torch.no_grad():
        assert_close(run_in_pieces(layer, x, cuts=[7, 8, 20, 21]), layer(x), 1e-5, "pieces")


def test_packed_documents_match_documents_run_separately():
    layer = make(seed=7)
    x = randn(2, 32, D_MODEL, seed=8)
    seq_idx = random_seq_idx(2, 32, 3, seed=9)
    with torch.no_grad():
        assert_close(layer(x, seq_idx=seq_idx), run_documents_separately(layer, x, seq_idx), 1e-5, "packed")


def _to_zamba_mixer_state(layer: Mamba) -> dict:
    """Our parameters under transformers' ZambaMambaMixer names and layouts: its in_proj rows
    alternate x and z channels (row 2c is x's channel c, row 2c + 1 is z's), A_log and D are per head."""
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x_rows, z_rows = state["in_proj.weight"].chunk(2, dim=0)
    state["in_proj.weight"] = torch.stack([x_rows, z_rows], dim=1).reshape(2 * layer.d_inner, -1)
    state["A_log"] = state["A_log"].reshape(layer.n_heads, layer.headdim, layer.d_state)
    state["D"] = state["D"].reshape(layer.n_heads, layer.headdim)
    return state


@pytest.mark.parametrize("n_heads", [2, 4])
def test_matches_transformers_zamba_mixer(n_heads):
    """Parity with transformers' ZambaMambaMixer (its PyTorch path), weights mapped as in zoo/hf.py."""
    import transformers   # a test dependency (pyproject [test]): fail loudly rather than skip
    from transformers.models.zamba.modeling_zamba import ZambaMambaMixer

    config = transformers.ZambaConfig(hidden_size=D_MODEL, num_hidden_layers=3, mamba_d_state=4, mamba_expand=2,
                                      mamba_d_conv=4, mamba_dt_rank=3, n_mamba_heads=n_heads)
    ours = make(seed=10 + n_heads, n_heads=n_heads)
    theirs = ZambaMambaMixer(config, layer_idx=0).eval()
    theirs.load_state_dict(_to_zamba_mixer_state(ours), strict=True)
    x = randn(2, 11, D_MODEL, seed=12)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), 1e-5, f"zamba mixer, {n_heads} heads")


def test_gradients_reach_every_parameter():
    layer = make(seed=13, inner_norms="learned")
    x = randn(2, 8, D_MODEL, seed=14).requires_grad_()
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs", [dict(n_heads=0), dict(n_heads=3), dict(n_heads=True)])
def test_bad_n_heads_names_the_argument(kwargs):
    with pytest.raises(ValueError, match="n_heads"):
        Mamba(D_MODEL, **kwargs)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
def test_cuda_multi_head_layer_matches_cpu_and_decodes_like_full_forward():
    cpu = make(seed=15)
    gpu = make(seed=15).cuda()
    x = randn(2, 40, D_MODEL, seed=16)
    with torch.no_grad():
        assert_close(gpu(x.cuda()).cpu(), cpu(x), 1e-4, "cuda vs cpu")
        full = gpu(x.cuda())
        assert_close(run_in_pieces(gpu, x.cuda(), cuts=[17] + list(range(18, 40))), full, 1e-4, "cuda pieces")
