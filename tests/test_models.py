"""Model assembly: decode == full forward, packed documents, shared blocks (Zamba semantics written
out by hand), MoE auxiliary losses, init, parameter counts, bidirectional mixing, image classifier."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, random_seq_idx, run_documents_separately
from zoo.models import SharedSite, build_model

HYBRID = {
    "name": "hybrid-test", "d_model": 16, "vocab_size": 32, "norm_eps": 1e-5,
    "mamba": {"d_state": 4}, "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
    "attention": {"n_heads": 2, "rope": True}, "mlp": {"d_ff": 32, "activation": "geglu"},
    "moe": {"d_ff": 16, "num_experts": 4, "top_k": 2},
    "shared": {"blk": {"input": "concat_embeddings", "blocks": ["attention", "mlp"], "lora_rank": 2,
                       "lora_targets": ["mlp", "qkv"]}},
    "pattern": "mM*E-M", "symbols": {"m": "mamba"},
    "insert": {"blk": {"at": 1, "every": 3}},
}


def _hybrid(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(copy.deepcopy(HYBRID), **overrides)
    with torch.no_grad():                  # LoRA B starts at zero: make the adapters do something
        for site in model.layers:
            if isinstance(site, SharedSite):
                for adapter in site.lora.values():
                    adapter[1].weight.normal_(std=0.3)
    return model.eval()


def _without_shared(**changes) -> dict:
    cfg = {k: v for k, v in copy.deepcopy(HYBRID).items() if k not in ("shared", "insert")}
    return {**cfg, **changes}


def _ids(batch, seqlen, vocab=32, seed=0):
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def test_hybrid_has_every_layer_type_and_two_shared_sites():
    model = _hybrid()
    assert [e["type"] for e in model.layout] == ["mamba", "shared", "mamba2", "attention", "moe", "shared",
                                                 "mlp", "mamba2"]


def test_decode_matches_full_forward_for_hybrid_with_attention_moe_and_shared_block():
    model = _hybrid()
    ids = _ids(2, 13)
    full = model(ids).logits
    state = model.init_state(2)
    outs = [model(ids[:, :5], state=state).logits]           # prefill
    for t in range(5, 13):                                     # then one token at a time
        outs.append(model(ids[:, t:t + 1], state=state).logits)
    assert_close(torch.cat(outs, 1), full, 1e-4, "prefill + decode vs full")


def test_chunked_prefill_matches_full_forward():
    model = _hybrid(seed=1)
    ids = _ids(1, 20, seed=1)
    full = model(ids).logits
    state = model.init_state(1)
    pieces = [model(ids[:, a:b], state=state).logits for a, b in ((0, 7), (7, 8), (8, 20))]
    assert_close(torch.cat(pieces, 1), full, 1e-4, "chunked prefill vs full")


def test_packed_documents_do_not_leak():
    model = _hybrid(seed=2)
    ids = _ids(2, 18, seed=2)
    seq_idx = random_seq_idx(2, 18, 3, seed=2)
    packed = model(ids, seq_idx=seq_idx).logits
    for b in range(2):
        for doc in seq_idx[b].unique():
            pos = (seq_idx[b] == doc).nonzero().squeeze(-1)
            alone = model(ids[b:b + 1, pos]).logits[0]
            assert_close(packed[b, pos], alone, 1e-4, f"row {b} document {int(doc)}")


def test_moe_aux_losses_are_the_sum_over_moe_layers():
    model = _hybrid(seed=3)
    seen = []
    for module in model.modules():
        if type(module).__name__ == "MoE":
            module.register_forward_hook(lambda m, args, out: seen.append(out[1]))
    out = model(_ids(2, 9, seed=3))
    assert len(seen) == 1
    for name in ("load_balancing_loss", "router_z_loss"):
        assert torch.equal(out.aux_losses[name], sum(aux[name] for aux in seen))
    assert torch.allclose(out.aux_loss, sum(out.aux_losses.values()))
    no_moe = build_model(_without_shared(pattern="mM"))
    assert float(no_moe(_ids(1, 4)).aux_loss) == 0.0 and no_moe(_ids(1, 4)).aux_losses == {}


def test_shared_site_follows_zamba_equations():
    """mamba, [shared block], mamba; the block as in Zamba: a = attn(norm(cat(h, emb))),
    y = mlp(norm(a)) with the site's LoRA on gate/up, t = site.linear(y); then h + mamba(norm(h + t))."""
    cfg = {"d_model": 16, "vocab_size": 32, "mamba": {"d_state": 4}, "attention": {"n_heads": 2},
           "mlp": {"d_ff": 24, "activation": "geglu"}, "layers": ["mamba", "mamba"],
           "shared": {"blk": {"input": "concat_embeddings", "blocks": ["attention", "mlp"], "lora_rank": 3}},
           "insert": {"blk": {"at": 1}}}
    torch.manual_seed(0)
    model = build_model(cfg)
    site = model.layers[1]
    with torch.no_grad():
        site.lora["blocks_1_mlp"][1].weight.normal_()
    ids = _ids(2, 7)
    blk, first, last = model.shared["blk"], model.layers[0], model.layers[2]
    emb = model.embedding(ids)
    h = emb.float()
    h = h + first.mixer(first.norm(h))
    a = blk.blocks[0](blk.norms[0](torch.cat([h, emb], -1)))          # [b, l, d]: o_proj maps 2d -> d
    m_in = blk.norms[1](a)
    mlp, adapter = blk.blocks[1], site.lora["blocks_1_mlp"]
    lora = adapter[1](adapter[0](m_in))
    gate = F.linear(m_in, mlp.gate_proj.weight) + lora[..., :24]
    up = F.linear(m_in, mlp.up_proj.weight) + lora[..., 24:]
    t = site.linear(mlp.down_proj(F.gelu(gate) * up))
    h = h + last.mixer(last.norm(h + t))
    want = model.lm_head(model.norm_f(h))
    assert_close(model(ids).logits, want, 1e-6, "model vs Zamba equations")


def test_shared_block_weights_exist_once_and_sites_own_their_linear_and_lora():
    model = _hybrid()
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.startswith("shared.blk.") for n in names) == len(list(model.shared["blk"].parameters()))
    sites = [m for m in model.layers if isinstance(m, SharedSite)]
    assert sites[0].linear.weight is not sites[1].linear.weight
    assert set(sites[0].lora) == {"blocks_0_q_proj", "blocks_0_k_proj", "blocks_0_v_proj", "blocks_1_mlp"}
    model(_ids(1, 5)).logits.sum().backward()
    q = model.shared["blk"].blocks[0].q_proj.weight
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert all(s.lora["blocks_1_mlp"][0].weight.grad.abs().sum() > 0 for s in sites)
    states = model.init_state(1)
    assert states[1][0] is not states[5][0]                     # each site keeps its own KV cache


def test_output_to_residual_adds_the_site_output_to_the_stream():
    cfg = {"d_model": 8, "vocab_size": 16, "mlp": {"d_ff": 8}, "layers": ["mlp"],
           "shared": {"blk": {"blocks": ["mlp"], "output": "residual"}}, "insert": {"blk": {"at": 0}}}
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = _ids(1, 4, vocab=16)
    blk, site, last = model.shared["blk"], model.layers[0], model.layers[1]
    h = model.embedding(ids).float()
    h = h + site.linear(blk.blocks[0](blk.norms[0](h)))
    h = h + last.mixer(last.norm(h))
    assert_close(model(ids).logits, model.lm_head(model.norm_f(h)), 1e-6, "residual site")


def test_tied_head_shares_the_embedding_and_untied_does_not():
    tied = build_model(_without_shared(pattern="M"))
    untied = build_model(_without_shared(pattern="M", tie_embeddings=False))
    assert tied.lm_head.weight is tied.embedding.weight
    assert untied.lm_head.weight is not untied.embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == 32 * 16


def test_init_rescales_output_projections_by_sqrt_of_residual_count_exactly_once():
    cfg = {**HYBRID, "mamba": {"d_state": 4, "bias": True}, "attention": {"n_heads": 2, "bias": True}}
    torch.manual_seed(0)
    scaled = build_model(cfg)
    torch.manual_seed(0)
    plain = build_model(cfg, **{"init.rescale_out_proj": False})
    n_residuals = 6                                              # main-stack sublayers of "mM*E-M"
    for (name, a), (_, b) in zip(scaled.named_parameters(), plain.named_parameters()):
        parts = name.split(".")
        if parts[-1] != "bias" and set(parts[-2:]) & {"out_proj", "o_proj", "down_proj"} and ".linear." not in name:
            assert torch.allclose(a, b / math.sqrt(n_residuals)), name
        else:
            assert torch.equal(a, b), name
    # init_weights() is the whole init from scratch: running it twice gives the same weights
    torch.manual_seed(5)
    scaled.init_weights()
    first = {k: v.clone() for k, v in scaled.state_dict().items()}
    torch.manual_seed(5)
    scaled.init_weights()
    assert all(torch.equal(first[k], v) for k, v in scaled.state_dict().items())
    mamba = scaled.layers[0].mixer
    assert torch.count_nonzero(mamba.in_proj.bias) == 0 and torch.count_nonzero(mamba.out_proj.bias) == 0
    assert torch.count_nonzero(scaled.layers[3].mixer.q_proj.bias) == 0
    assert torch.count_nonzero(mamba.dt_proj.bias) == mamba.dt_proj.bias.numel()   # the layer's own init
    assert abs(scaled.embedding.weight.std().item() - 0.02) < 0.003


def test_rebuilding_from_model_config_gives_the_identical_model():
    torch.manual_seed(0)
    a = build_model(copy.deepcopy(HYBRID))
    torch.manual_seed(0)
    b = build_model(a.config)
    assert b.config == a.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_meta_build_then_to_empty_and_init_weights_runs():
    model = build_model(copy.deepcopy(HYBRID), device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert torch.isfinite(model(_ids(1, 6)).logits).all()


def test_active_parameters_count_top_k_of_the_experts():
    model = build_model(_without_shared(pattern="MEE", moe={"d_ff": 16, "num_experts": 4, "top_k": 1}))
    per_expert = 3 * 16 * 16                                     # gated SwiGLU expert: gate, up, down
    assert model.num_parameters() - model.num_parameters(active=True) == 2 * 3 * per_expert
    assert sum(model.parameters_by_type().values()) == model.num_parameters()


# ------------------------------------------------------------------------------ bidirectional

@pytest.mark.parametrize("inner_norms", [None, "learned"])
def test_bimamba_is_the_average_of_forward_and_flipped_twin_mambas(inner_norms):
    from layers.bidirectional import BiMamba
    from layers.mamba import Mamba

    torch.manual_seed(0)
    bi = BiMamba(16, d_state=4, inner_norms=inner_norms)
    with torch.no_grad():                           # norms start at one: make the two directions differ
        for name, p in bi.named_parameters():
            if "layernorm" in name:
                p.normal_()
    fwd, bwd = Mamba(16, d_state=4, inner_norms=inner_norms), Mamba(16, d_state=4, inner_norms=inner_norms)
    sd = bi.state_dict()
    shared = {k: v for k, v in sd.items() if k.startswith(("in_proj", "out_proj"))}
    fwd.load_state_dict({k: v for k, v in sd.items() if k in fwd.state_dict()})
    backward = {}
    for k, v in sd.items():
        head, _, tail = k.partition(".")
        if head in ("A_b_log", "D_b"):
            backward[{"A_b_log": "A_log", "D_b": "D"}[head]] = v
        elif head.endswith("_b"):                    # conv1d_b, x_proj_b, dt_proj_b, *_layernorm_b
            backward[head[:-2] + "." + tail] = v
    bwd.load_state_dict({**backward, **shared})
    x = torch.randn(2, 11, 16)
    want = (fwd(x) + bwd(x.flip(1)).flip(1)) / 2
    assert_close(bi(x), want, 1e-5, "BiMamba vs twins")
    assert {"conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.weight", "A_b_log", "D_b"} <= set(sd)


@pytest.mark.parametrize("mixer", [{"type": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
                                   {"type": "mamba", "d_state": 4}])
def test_bidirectional_wrapper_keeps_packed_documents_apart(mixer):
    from layers.bidirectional import Bidirectional

    torch.manual_seed(0)
    layer = Bidirectional(16, mixer)
    x = torch.randn(2, 14, 16)
    seq_idx = random_seq_idx(2, 14, 3, seed=4)
    assert_close(layer(x, seq_idx=seq_idx), run_documents_separately(layer, x, seq_idx), 1e-5, "packed")
    y_sum = Bidirectional(16, mixer, combine="sum")
    y_sum.load_state_dict(layer.state_dict())
    assert_close(y_sum(x), 2 * layer(x), 1e-6, "sum == 2 * mean")


def test_image_classifier_class_token_sees_every_patch_only_when_bidirectional():
    base = {"model": "image_classifier", "d_model": 16, "mamba": {"d_state": 4}, "layers": {"count": 2, "mixer": "mamba"},
            "image": {"image_size": 16, "patch_size": 4, "in_channels": 3, "num_classes": 5}}
    images = torch.randn(2, 3, 16, 16)
    for bidirectional, sees_last in ((True, True), (False, False)):
        torch.manual_seed(0)
        model = build_model({**base, "bidirectional": bidirectional})
        x = images.clone().requires_grad_(True)
        out = model(x)
        assert out.logits.shape == (2, 5)
        out.logits.sum().backward()
        first_patch, last_patch = x.grad[:, :, :4, :4], x.grad[:, :, -4:, -4:]
        assert first_patch.abs().sum() > 0
        assert (last_patch.abs().sum() > 0) == sees_last       # middle class token: causal misses the tail


@pytest.mark.parametrize("pool", ["head_cls", "mean"])
def test_image_classifier_pools(pool):
    model = build_model({"model": "image_classifier", "d_model": 16, "mamba": {"d_state": 4},
                         "layers": {"count": 1, "mixer": "mamba"},
                         "image": {"image_size": 8, "patch_size": 4, "num_classes": 3, "pool": pool}})
    assert model(torch.randn(2, 3, 8, 8)).logits.shape == (2, 3)
    assert (model.cls_token is None) == (pool == "mean")
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(1, 3, 12, 12))


def test_no_weight_decay_marks_survive_meta_materialisation():
    """to_empty() replaces Parameters (dropping attributes): the decay-free marks of every Mamba
    variant, the backward direction of Vision Mamba included, must come back."""
    from layers import BiMamba, Mamba, Mamba2
    for layer, names in ((Mamba(d_model=16, device="meta"), ("A_log", "D", "dt_proj.bias")),
                         (BiMamba(d_model=16, device="meta"), ("A_log", "A_b_log", "D_b", "dt_proj_b.bias")),
                         (Mamba2(d_model=32, headdim=16, d_state=8, device="meta"), ("A_log", "D", "dt_bias"))):
        layer = layer.to_empty(device="cpu")
        layer.reset_parameters()
        params = dict(layer.named_parameters())
        for name in names:
            assert getattr(params[name], "_no_weight_decay", False), f"{type(layer).__name__}.{name}"
