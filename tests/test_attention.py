"""Attention against a naive float64 definition; KV-cache continuation, sliding window, packed documents,
RoPE's relative-position property, argument errors."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import assert_close, randn, random_seq_idx, run_documents_separately, run_in_pieces
from layers.attention import Attention, KVCache, flash_attn_available
from layers.rope import apply_rope, rope_cos_sin


def _randomise(layer: Attention, seed: int) -> Attention:
    """Larger-than-init weights so attention patterns are far from uniform (the test then proves more)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * (0.3 if p.dim() > 1 else 1.0))
    return layer


def naive_attention(layer: Attention, x: torch.Tensor, seq_idx=None) -> torch.Tensor:
    """The definition, one query and one key at a time, in float64, from the layer's weights.

    RoPE here rotates each pair (i, i + rotary_dim/2) by angle pos * theta^(-2i/rotary_dim) with an
    explicit 2x2 rotation; QK-norm is x / rms(x) * weight per head; GQA maps query head h to key head
    h // (n_heads / n_kv_heads).
    """
    d = {n: p.detach().double() for n, p in layer.named_parameters()}
    x = x.double()
    batch, seqlen, _ = x.shape
    nh, nkv, hd = layer.n_heads, layer.n_kv_heads, layer.head_dim

    def proj(name, n):
        y = x @ d[f"{name}.weight"].T
        if f"{name}.bias" in d:
            y = y + d[f"{name}.bias"]
        return y.view(batch, seqlen, n, hd)

    q, k, v = proj("q_proj", nh), proj("k_proj", nkv), proj("v_proj", nkv)
    if layer.qk_norm:
        q = q / torch.sqrt((q * q).mean(-1, keepdim=True) + layer.q_norm.eps) * d["q_norm.weight"]
        k = k / torch.sqrt((k * k).mean(-1, keepdim=True) + layer.k_norm.eps) * d["k_norm.weight"]
    if layer.rope:
        rd = layer.rotary_dim
        for t in (q, k):
            for pos in range(seqlen):
                for i in range(rd // 2):
                    angle = pos * layer.rope_theta ** (-2 * i / rd)
                    a, b = t[:, pos, :, i].clone(), t[:, pos, :, i + rd // 2].clone()
                    t[:, pos, :, i] = a * math.cos(angle) - b * math.sin(angle)
                    t[:, pos, :, i + rd // 2] = a * math.sin(angle) + b * math.cos(angle)
    out = torch.zeros(batch, seqlen, nh, hd, dtype=torch.float64)
    for b in range(batch):
        for h in range(nh):
            kh = h // (nh // nkv)
            for i in range(seqlen):
                keys = [j for j in range(seqlen)
                        if (not layer.causal or j <= i)
                        and (layer.window is None or i - j < layer.window)
                        and (seq_idx is None or seq_idx[b, j] == seq_idx[b, i])]
                scores = torch.stack([q[b, i, h] @ k[b, j, kh] for j in keys]) * layer.softmax_scale
                weights = torch.softmax(scores, 0)
                out[b, i, h] = sum(w * v[b, j, kh] for w, j in zip(weights, keys))
    y = out.reshape(batch, seqlen, nh * hd) @ d["o_proj.weight"].T
    return y + d["o_proj.bias"] if "o_proj.bias" in d else y


CONFIGS = {
    "causal": {},
    "bidirectional": {"causal": False},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "window": {"window": 3},
    "rope_full": {"rope": True},
    "rope_partial": {"rope": True, "rope_fraction": 0.5, "rope_theta": 500.0},
    "qk_norm": {"qk_norm": True, "rope": True, "n_kv_heads": 2},
    "bias_head_dim_scale": {"bias": True, "head_dim": 6, "softmax_scale": 0.3},
}


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_matches_naive_float64_definition(name, backend):
    layer = _randomise(Attention(16, 4, backend=backend, **CONFIGS[name]), seed=1)
    x = randn(2, 9, 16, seed=2)
    assert_close(layer(x), naive_attention(layer, x), 1e-5, name)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_match_naive_definition(backend, causal):
    layer = _randomise(Attention(16, 4, n_kv_heads=2, rope=True, causal=causal, backend=backend), seed=3)
    x, seq_idx = randn(2, 11, 16, seed=4), random_seq_idx(2, 11, 3, seed=5)
    assert_close(layer(x, seq_idx=seq_idx), naive_attention(layer, x, seq_idx), 1e-5, "packed")


@pytest.mark.parametrize("window,causal", [(None, True), (4, True), (None, False)])
def test_packed_documents_equal_documents_alone(window, causal):
    layer = _randomise(Attention(16, 4, n_kv_heads=2, rope=True, rope_fraction=0.5, qk_norm=True,
                                 window=window, causal=causal), seed=6)
    x, seq_idx = randn(3, 14, 16, seed=7), random_seq_idx(3, 14, 4, seed=8)
    # RoPE makes scores depend on offsets only, so absolute positions that keep counting across a
    # document boundary give the same result as restarting at 0.
    assert_close(layer(x, seq_idx=seq_idx), run_documents_separately(layer, x, seq_idx), 1e-5, "documents")


STATE_CONFIGS = {
    "plain": {},
    "gqa_rope_qknorm": {"n_kv_heads": 2, "rope": True, "qk_norm": True},
    "window": {"n_kv_heads": 2, "rope": True, "window": 4},
    "window_1": {"rope": True, "window": 1},
}


@pytest.mark.parametrize("max_seqlen", [None, 20])
@pytest.mark.parametrize("name", list(STATE_CONFIGS))
def test_decode_and_chunked_prefill_equal_full_forward(name, max_seqlen):
    layer = _randomise(Attention(16, 4, **STATE_CONFIGS[name]), seed=9)
    x = randn(2, 13, 16, seed=10)
    full = layer(x)
    kw = {"max_seqlen": max_seqlen} if max_seqlen else {}
    assert_close(run_in_pieces(layer, x, list(range(1, 13)), **kw), full, 1e-5, "token by token")
    assert_close(run_in_pieces(layer, x, [5, 6, 11], **kw), full, 1e-5, "pieces")
    assert_close(run_in_pieces(layer, x, [3, 9], **kw), full, 1e-5, "prefill + decode")


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cache_continues_packed_documents(backend):
    layer = _randomise(Attention(16, 4, n_kv_heads=2, rope=True, window=5, backend=backend), seed=11)
    x, seq_idx = randn(2, 12, 16, seed=12), random_seq_idx(2, 12, 3, seed=13)
    full = layer(x, seq_idx=seq_idx)
    state = layer.init_state(2)
    outs = [layer(x[:, a:b], state=state, seq_idx=seq_idx[:, a:b]) for a, b in [(0, 4), (4, 5), (5, 12)]]
    assert_close(torch.cat(outs, 1), full, 1e-5, "packed through the cache")


def test_cache_without_seq_idx_continues_the_last_document():
    layer = _randomise(Attention(16, 4, rope=True), seed=24)
    x = randn(1, 10, 16, seed=25)
    seq_idx = torch.tensor([[0] * 4 + [1] * 6], dtype=torch.int32)
    state = layer.init_state(1)
    first = layer(x[:, :5], state=state, seq_idx=seq_idx[:, :5])
    rest = layer(x[:, 5:], state=state)  # no seq_idx: the tokens belong to document 1, as the last cached key
    assert_close(torch.cat([first, rest], 1), layer(x, seq_idx=seq_idx), 1e-5, "continued document")


def test_sliding_window_cache_keeps_only_visible_keys():
    layer = _randomise(Attention(16, 4, window=4), seed=14)
    x = randn(1, 30, 16, seed=15)
    state = layer.init_state(1)
    layer(x[:, :10], state=state)
    assert state.length == 3 and state.k.shape[2] == 3 and state.seqlen_offset == 10
    # A preallocated buffer smaller than the sequence works as long as window - 1 + new tokens fit.
    small = layer.init_state(1, max_seqlen=8)
    out = torch.cat([layer(x[:, i:i + 5], state=small) for i in range(0, 30, 5)], 1)
    assert_close(out, layer(x), 1e-5, "sliding buffer")
    assert small.k.shape[2] == 8


def test_preallocated_cache_overflow_names_the_fix():
    layer = Attention(16, 4)
    state = layer.init_state(1, max_seqlen=4)
    layer(randn(1, 3, 16), state=state)
    with pytest.raises(ValueError, match="max_seqlen"):
        layer(randn(1, 2, 16), state=state)


def test_gradients_of_sdpa_match_math_backend():
    torch.manual_seed(0)
    x = randn(2, 7, 16, seed=16).requires_grad_()
    sid = random_seq_idx(2, 7, 2, seed=17)
    grads = []
    for backend in ("sdpa", "math"):
        layer = _randomise(Attention(16, 4, n_kv_heads=2, rope=True, window=3, backend=backend), seed=18)
        layer(x, seq_idx=sid).square().sum().backward()
        grads.append((x.grad.clone(), layer.q_proj.weight.grad.clone()))
        x.grad = None
    assert_close(grads[0][0], grads[1][0], 1e-5, "dx")
    assert_close(grads[0][1], grads[1][1], 1e-5, "dW_q")


@pytest.mark.parametrize("rope_fraction", [1.0, 0.5])
def test_rope_scores_depend_only_on_offset(rope_fraction):
    head_dim = 8
    rotary_dim = int(head_dim * rope_fraction)
    assert rope_cos_sin(torch.arange(3), rotary_dim, 100.0)[0].shape == (3, rotary_dim // 2)
    q, k = randn(1, 1, 1, head_dim, seed=19), randn(1, 1, 1, head_dim, seed=20)

    def score(m, n):
        qm = apply_rope(q, *rope_cos_sin(torch.tensor([m]), rotary_dim, 100.0))
        kn = apply_rope(k, *rope_cos_sin(torch.tensor([n]), rotary_dim, 100.0))
        return (qm * kn).sum().double()

    for m, n in [(0, 3), (5, 2)]:
        for shift in (1, 17, 1000):
            assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-4 * abs(score(m, n)) + 1e-5
    assert abs(score(0, 3) - score(0, 5)) > 1e-3, "different offsets should give different scores"
    rotated = apply_rope(q, *rope_cos_sin(torch.tensor([7]), rotary_dim, 100.0))
    assert torch.equal(rotated[..., rotary_dim:], q[..., rotary_dim:]), "unrotated channels pass through"
    assert_close(rotated.norm(), q.norm(), 1e-6, "rotation keeps the norm")


BAD_ARGS = [
    ({"d_model": 30, "n_heads": 4}, "head_dim"),
    ({"d_model": 32, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
    ({"d_model": 32, "n_heads": 4, "rope": True, "rope_fraction": 0.3}, "rope_fraction"),
    ({"d_model": 32, "n_heads": 4, "window": 0}, "window"),
    ({"d_model": 32, "n_heads": 4, "window": 4, "causal": False}, "causal=True"),
    ({"d_model": 32, "n_heads": 4, "backend": "xformers"}, "sdpa"),
    ({"d_model": 32, "n_heads": 4, "softmax_scale": -1.0}, "softmax_scale"),
]


@pytest.mark.parametrize("kwargs,fix", BAD_ARGS)
def test_bad_arguments_name_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        Attention(**kwargs)


def test_flash_attn_backend_needs_the_package():
    if flash_attn_available():
        assert Attention(32, 4, backend="flash_attn").backend == "flash_attn"
    else:
        with pytest.raises(ValueError, match="pip install flash-attn"):
            Attention(32, 4, backend="flash_attn")


def test_positions_beyond_max_position_embeddings_are_an_error():
    layer = Attention(16, 4, rope=True, max_position_embeddings=8)
    state = layer.init_state(1)
    layer(randn(1, 6, 16), state=state)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        layer(randn(1, 3, 16), state=state)


def test_bidirectional_layer_has_no_cache():
    with pytest.raises(ValueError, match="causal"):
        Attention(16, 4, causal=False).init_state(1)


def test_built_on_meta_then_materialised_matches_documented_init():
    layer = Attention(16, 4, qk_norm=True, bias=True, device="meta")
    layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    assert torch.equal(layer.q_norm.weight, torch.ones(4)) and torch.equal(layer.o_proj.bias, torch.zeros(16))
    assert 0.01 < layer.q_proj.weight.std().item() < 0.03
    assert isinstance(layer.init_state(2), KVCache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["gqa_rope_qknorm", "window"])
def test_cuda_bf16_sdpa_matches_fp32_math_with_cache(name):
    cpu = _randomise(Attention(64, 4, **STATE_CONFIGS[name], backend="math"), seed=21)
    gpu = Attention(64, 4, **STATE_CONFIGS[name], device="cuda", dtype=torch.bfloat16)
    gpu.load_state_dict(cpu.state_dict())
    x, sid = randn(2, 300, 64, seed=22), random_seq_idx(2, 300, 3, seed=23)
    ref = cpu(x)
    xg = x.cuda().bfloat16()
    assert_close(gpu(xg).float().cpu(), ref, 1e-2, "full")
    assert_close(run_in_pieces(gpu, xg, [100, 101, 250]).float().cpu(), ref, 1e-2, "pieces")
    assert_close(gpu(xg, seq_idx=sid.cuda()).float().cpu(), cpu(x, seq_idx=sid), 1e-2, "packed")


# The fused RoPE kernel against the PyTorch specification, outputs and gradients, partial rotary and
# bf16 included. TRITON_INTERPRET=1 must precede Triton's first import, hence a fresh process on CPU.
ROPE_KERNEL_CHECK = textwrap.dedent("""
    import torch
    from kernels.rope import apply_rope, apply_rope_ref
    from kernels.rope.interface import _use_triton
    from layers.rope import rope_cos_sin
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [((2, 5, 3, 8), 8, torch.float32), ((1, 7, 2, 12), 6, torch.float32),
             ((2, 3, 4, 16), 8, torch.bfloat16), ((1, 300, 5, 64), 32, torch.bfloat16)]
    for shape, rotary_dim, dtype in cases:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
        cos, sin = rope_cos_sin(torch.arange(40, 40 + shape[1], device=device), rotary_dim, 100.0)
        assert _use_triton(x), "the Triton kernel should serve this input"
        y = apply_rope(x, cos, sin)
        (dx,) = torch.autograd.grad(y, x, dy)
        y_ref = apply_rope_ref(x, cos, sin)
        (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        for a, b, what in ((y, y_ref, "out"), (dx, dx_ref, "grad")):
            err = ((a.double() - b.double()).norm() / b.double().norm()).item()
            assert err < tol, (shape, rotary_dim, dtype, what, err)
    print("ROPE_KERNEL_OK")
""")


def test_fused_rope_kernel_matches_pytorch_specification():
    env = dict(os.environ, TRITON_INTERPRET="0" if torch.cuda.is_available() else "1", HYBRID_ZOO_KERNELS="auto")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", ROPE_KERNEL_CHECK], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert "ROPE_KERNEL_OK" in result.stdout, result.stdout + result.stderr
