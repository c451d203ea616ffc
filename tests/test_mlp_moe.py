"""MLP activations against their formulas; MoE routing, expert dispatch and auxiliary losses against
plain per-token loops and the definitions."""
import math

import pytest
import torch

import layers.moe as moe_module
from helpers import assert_close, randn
from layers.mlp import MLP
from layers.moe import MoE, load_balancing_loss, router_z_loss

# Float64 formulas, written from the definitions rather than with torch.nn.functional.
FORMULAS = {
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "relu2": lambda x: torch.where(x > 0, x * x, torch.zeros_like(x)),
}
GATED = {"swiglu": "silu", "geglu": "gelu"}


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return module


def naive_mlp(x, activation, gate_w, up_w, down_w, gate_b=None, up_b=None, down_b=None):
    """x [n, d] float64 -> [n, d]; weights input-major ([in, out])."""
    def lin(h, w, b):
        return h @ w + (b if b is not None else 0)
    if activation in GATED:
        h = FORMULAS[GATED[activation]](lin(x, gate_w, gate_b)) * lin(x, up_w, up_b)
    else:
        h = FORMULAS[activation](lin(x, up_w, up_b))
    return lin(h, down_w, down_b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu2", "silu", "relu"])
def test_mlp_matches_activation_formula(activation, bias):
    mlp = _randomise(MLP(8, 12, activation=activation, bias=bias), seed=1)
    x = randn(2, 5, 8, seed=2)
    p = {n: t.detach().double() for n, t in mlp.named_parameters()}
    gated = activation in GATED
    expected = naive_mlp(x.double().view(-1, 8), activation,
                         p["gate_proj.weight"].T if gated else None, p["up_proj.weight"].T, p["down_proj.weight"].T,
                         p.get("gate_proj.bias"), p.get("up_proj.bias"), p.get("down_proj.bias"))
    assert_close(mlp(x), expected.view(2, 5, 8), 1e-6, activation)
    names = {n.split(".")[0] for n, _ in mlp.named_parameters()}
    assert names == ({"gate_proj", "up_proj", "down_proj"} if gated else {"up_proj", "down_proj"})
    assert mlp.init_state(2) is None


def test_unknown_activation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="swiglu, geglu, gelu, relu2, silu, relu"):
        MLP(8, 16, activation="tanh")
    with pytest.raises(ValueError, match="d_ff"):
        MLP(8, 0)


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Route and run each token through its experts one at a time, in float64, from the definition."""
    p = {n: t.detach().double() for n, t in moe.named_parameters()}
    xs = x.double().reshape(-1, moe.d_model)
    out = torch.zeros_like(xs)
    for t, xt in enumerate(xs):
        logits = p["router.weight"] @ xt
        if moe.router_type == "softmax":
            scores = torch.exp(logits - logits.max())
            scores = scores / scores.sum()
            chosen = sorted(range(moe.num_experts), key=lambda e: -scores[e])[: moe.top_k]
        else:
            scores = 1 / (1 + torch.exp(-logits))
            biased = scores + moe.e_score_correction_bias.double()
            chosen = sorted(range(moe.num_experts), key=lambda e: -biased[e])[: moe.top_k]
        weights = torch.stack([scores[e] for e in chosen])
        if moe.normalize_topk:
            weights = weights / weights.sum()
        for w, e in zip(weights * moe.routed_scaling_factor, chosen):
            b = (lambda n: p[f"experts.{n}"][e] if f"experts.{n}" in p else None)
            out[t] += w * naive_mlp(xt[None], moe.experts.activation,
                                    p["experts.gate_proj"][e] if moe.experts.gated else None,
                                    p["experts.up_proj"][e], p["experts.down_proj"][e],
                                    b("gate_bias"), b("up_bias"), b("down_bias"))[0]
        if moe.shared_expert is not None:
            s = {n[len("shared_expert."):]: w for n, w in p.items() if n.startswith("shared_expert.")}
            out[t] += naive_mlp(xt[None], moe.shared_expert.activation,
                                s["gate_proj.weight"].T if moe.shared_expert.gated else None,
                                s["up_proj.weight"].T, s["down_proj.weight"].T,
                                s.get("gate_proj.bias"), s.get("up_proj.bias"), s.get("down_proj.bias"))[0]
    return out.view(x.shape)


MOE_CONFIGS = {
    "softmax_top2": {"top_k": 2},
    "softmax_top1_switch": {"top_k": 1, "activation": "relu"},
    "softmax_top3_unnormalised_bias": {"top_k": 3, "normalize_topk": False, "bias": True},
    "sigmoid_deepseek": {"top_k": 2, "router": "sigmoid", "routed_scaling_factor": 2.5,
                         "shared_expert_d_ff": 6},
    "shared_expert_with_biases": {"top_k": 2, "shared_expert_d_ff": 6, "bias": True, "activation": "gelu"},
    "relu2_nemotron": {"top_k": 2, "router": "sigmoid", "activation": "relu2"},
}


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_moe_output_is_router_weighted_sum_of_its_experts(name):
    moe = _randomise(MoE(8, 12, num_experts=5, **MOE_CONFIGS[name]), seed=3)
    if moe.router_type == "sigmoid":
        moe.e_score_correction_bias.copy_(randn(5, seed=4) * 0.3)
    x = randn(3, 7, 8, seed=5)
    y, aux = moe(x)
    assert_close(y, naive_moe(moe, x), 1e-6, name)
    assert set(aux) == {"load_balancing_loss", "router_z_loss"} and all(v.dim() == 0 for v in aux.values())


def test_one_expert_equals_the_dense_mlp_with_the_same_weights():
    moe = _randomise(MoE(8, 12, num_experts=1, top_k=1, activation="swiglu"), seed=6)
    mlp = MLP(8, 12, activation="swiglu")
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(mlp, name).weight.copy_(getattr(moe.experts, name)[0].T)
    x = randn(2, 9, 8, seed=7)
    assert_close(moe(x)[0], mlp(x), 1e-6, "one expert")


def test_load_balancing_loss_is_one_for_uniform_routing_and_num_experts_when_collapsed():
    tokens, num_experts, k = 12, 4, 2
    uniform_probs = torch.full((tokens, num_experts), 1.0 / num_experts)
    # Every expert receives tokens * k / E slots.
    ids = torch.arange(tokens * k).remainder(num_experts).view(tokens, k)
    assert abs(load_balancing_loss(uniform_probs, ids, num_experts).item() - 1.0) < 1e-6
    collapsed = torch.zeros(tokens, num_experts)
    collapsed[:, 0] = 1.0
    all_first = torch.zeros(tokens, 1, dtype=torch.long)
    assert abs(load_balancing_loss(collapsed, all_first, num_experts).item() - num_experts) < 1e-6


def test_router_z_loss_matches_definition_and_layer_weights_its_losses():
    logits = randn(10, 6, seed=8, dtype=torch.float64)
    expected = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
    assert abs(router_z_loss(logits).item() - expected.item()) < 1e-6 * expected.item()
    moe = _randomise(MoE(8, 12, num_experts=6, top_k=2, load_balancing_coef=0.5, z_loss_coef=0.25), seed=9)
    x = randn(2, 5, 8, seed=10)
    _, aux = moe(x)
    logits = moe.router(x.reshape(-1, 8))
    probs = torch.softmax(logits.double(), -1)
    ids = probs.topk(2, dim=-1).indices
    assert_close(aux["router_z_loss"], 0.25 * router_z_loss(logits), 1e-6, "z")
    assert_close(aux["load_balancing_loss"], 0.5 * load_balancing_loss(probs, ids, 6), 1e-6, "lb")


@pytest.mark.parametrize("config", [{"top_k": 2}, {"top_k": 1}, {"top_k": 2, "router": "sigmoid"}])
def test_gradients_reach_the_router_through_output_and_losses(config):
    moe = _randomise(MoE(8, 12, num_experts=4, **config), seed=11)
    x = randn(2, 6, 8, seed=12)
    y, _ = moe(x)
    y.square().sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    moe.zero_grad()
    _, aux = moe(x)
    (aux["load_balancing_loss"] + aux["router_z_loss"]).backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_sigmoid_selection_bias_changes_selection_not_weights():
    moe = _randomise(MoE(8, 12, num_experts=6, top_k=2, router="sigmoid"), seed=13)
    x = randn(20, 8, seed=14)
    logits, _, ids_before, _ = moe.route(x)
    scores = torch.sigmoid(logits)
    favourite = 5
    assert not (ids_before == favourite).any(dim=-1).all(), "test needs tokens that avoid the favourite"
    moe.e_score_correction_bias[favourite] = 10.0
    _, _, ids, weights = moe.route(x)
    assert (ids == favourite).any(dim=-1).all(), "the selection bias decides which experts are chosen"
    chosen = scores.gather(-1, ids)
    assert_close(weights, chosen / chosen.sum(-1, keepdim=True), 1e-6, "weights from unbiased scores")
    assert "e_score_correction_bias" in dict(moe.named_buffers())
    assert "e_score_correction_bias" not in dict(moe.named_parameters())
    assert_close(moe(x[None])[0], naive_moe(moe, x[None]), 1e-6, "layer output with the bias")


def test_normalize_topk_defaults_follow_published_models():
    assert MoE(8, 8, 4, top_k=2).normalize_topk            # Mixtral
    assert not MoE(8, 8, 4, top_k=1).normalize_topk        # Switch / MoE-Mamba
    assert MoE(8, 8, 4, top_k=1, router="sigmoid").normalize_topk  # DeepSeek-V3 / NemotronH


BAD_ARGS = [
    ({"top_k": 5}, "top_k=5 must be <= num_experts=4"),
    ({"router": "hash"}, "softmax, sigmoid"),
    ({"activation": "tanh"}, "swiglu"),
    ({"load_balancing_coef": -1.0}, "load_balancing_coef"),
    ({"shared_expert_d_ff": 0}, "shared_expert_d_ff"),
]


@pytest.mark.parametrize("kwargs,fix", BAD_ARGS)
def test_bad_moe_arguments_name_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        MoE(8, 8, 4, **kwargs)


def test_moe_built_on_meta_materialises_and_runs():
    moe = MoE(8, 16, 4, router="sigmoid", shared_expert_d_ff=8, device="meta")
    moe.to_empty(device="cpu")
    moe.reset_parameters()
    assert torch.equal(moe.e_score_correction_bias, torch.zeros(4))
    y, aux = moe(randn(1, 3, 8))
    assert torch.isfinite(y).all() and moe.init_state(1) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_path_matches_per_expert_loop_on_cuda(bias, monkeypatch):
    moe = _randomise(MoE(64, 96, num_experts=8, top_k=2, bias=bias, shared_expert_d_ff=32), seed=15, scale=0.1)
    moe = moe.cuda().bfloat16()
    x = randn(4, 100, 64, seed=16).cuda().bfloat16().requires_grad_()
    assert moe_module._grouped_mm_usable(x, moe.experts.up_proj)
    y_grouped, _ = moe(x)
    y_grouped.float().square().sum().backward()
    grads = [x.grad.clone(), moe.experts.down_proj.grad.clone()]
    x.grad = None
    moe.zero_grad()
    monkeypatch.setattr(moe_module, "_grouped_mm_usable", lambda *a: False)
    y_loop, _ = moe(x)
    y_loop.float().square().sum().backward()
    assert_close(y_grouped.float(), y_loop.float(), 1e-2, "grouped vs loop")
    assert_close(grads[0].float(), x.grad.float(), 2e-2, "dx")
    assert_close(grads[1].float(), moe.experts.down_proj.grad.float(), 2e-2, "d down_proj")
    ref = naive_moe(moe.float().cpu(), x.detach().float().cpu())
    assert_close(y_grouped.float().cpu(), ref, 2e-2, "grouped vs float64 definition")
