"""Dropless top-k mixture of experts (Shazeer et al., 2017; Switch, Fedus et al., 2021; megablocks'
dropless semantics, Gale et al., 2022) with softmax or sigmoid (DeepSeek-V3 / NemotronH) routing.

x: [batch, seqlen, d_model] -> (y: [batch, seqlen, d_model], aux: {"load_balancing_loss", "router_z_loss"})

Every token reaches its k experts (no capacity, no dropping). The token-slots are sorted by expert,
each expert's projections run over its contiguous slice (one torch._grouped_mm per projection on CUDA
for bf16/fp16, a loop of matmuls otherwise), and the outputs are unsorted and summed with the router
weights in a fixed order (no atomics), so the forward is deterministic.
"""
from __future__ import annotations

import torch
from torch import nn

from .mlp import INIT_STD, MLP, activation_fn, check_positive

ROUTERS = ("softmax", "sigmoid")


def load_balancing_loss(router_probs: torch.Tensor, expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, E * sum_e f_e * P_e, in fp32 (1.0 when routing is uniform).

    router_probs: [tokens, num_experts], each row a distribution over experts.
    expert_indices: [tokens, k] chosen experts. f_e: fraction of the tokens * k slots sent to e;
    P_e: mean router probability of e.
    """
    slots = expert_indices.reshape(-1)
    f = torch.bincount(slots, minlength=num_experts).float() / max(slots.numel(), 1)
    p = router_probs.float().mean(0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al., 2022): mean over tokens of logsumexp(logits)^2, fp32.

    logits: [tokens, num_experts].
    """
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def _grouped_mm_usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm runs on CUDA for bf16/fp16 with 16-byte aligned rows (checked on an H200,
    torch 2.11; fp32 raises there)."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and all(w.dtype == x.dtype for w in weights)
            and all(s % 8 == 0 for w in weights for s in w.shape[1:]))


class GroupedExperts(nn.Module):
    """num_experts MLPs with stacked weights, laid out for grouped GEMMs (y = x @ W[e], input-major).

    gated activations: gate_proj, up_proj [E, d_model, d_ff]; all: up_proj [E, d_model, d_ff],
    down_proj [E, d_ff, d_model]; bias: gate_bias, up_bias [E, d_ff], down_bias [E, d_model].
    (The Hugging Face Mixtral layout is [E, d_ff, d_model] per nn.Linear: transpose the last two dims.)
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu",
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.act, self.gated = activation_fn(activation)
        self.num_experts, self.d_model, self.d_ff, self.activation = num_experts, d_model, d_ff, activation
        factory = {"device": device, "dtype": dtype}
        if self.gated:
            self.gate_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.up_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **factory))
        if bias:
            if self.gated:
                self.gate_bias = nn.Parameter(torch.empty(num_experts, d_ff, **factory))
            self.up_bias = nn.Parameter(torch.empty(num_experts, d_ff, **factory))
            self.down_bias = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        self.bias = bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ N(0, 0.02^2), biases zero (as MLP)."""
        for name, p in self.named_parameters(recurse=False):
            if name.endswith("_bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=INIT_STD)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, expert_of_slot: torch.Tensor) -> torch.Tensor:
        """x_sorted: [slots, d_model], grouped by expert (counts[e] rows for expert e, in expert order);
        counts: [E] int; expert_of_slot: [slots] -> [slots, d_model]."""
        weights = [self.up_proj, self.down_proj] + ([self.gate_proj] if self.gated else [])
        if _grouped_mm_usable(x_sorted, *weights):
            offsets = torch.cumsum(counts, 0).to(torch.int32)  # end of each expert's slice, stays on device

            def project(x, weight):
                return torch._grouped_mm(x, weight, offs=offsets)
        else:
            sizes = counts.tolist()  # the loop needs the slice sizes on the host

            def project(x, weight):
                return torch.cat([part @ weight[e] for e, part in enumerate(x.split(sizes))])

        def linear(x, weight, bias_name):
            y = project(x, weight)  # [slots, out]
            return y + getattr(self, bias_name)[expert_of_slot] if self.bias else y

        up = linear(x_sorted, self.up_proj, "up_bias")
        if self.gated:
            h = self.act(linear(x_sorted, self.gate_proj, "gate_bias")) * up  # [slots, d_ff]
        else:
            h = self.act(up)
        return linear(h, self.down_proj, "down_bias")

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation!r}, bias={self.bias}")


class MoE(nn.Module):
    """Dropless top-k mixture-of-experts feed-forward layer.

    d_model: model width; d_ff: each expert's hidden width; num_experts; top_k: experts per token;
    activation: expert MLP activation (as MLP). router: "softmax" (probabilities over all experts,
    Switch/Mixtral) or "sigmoid" (independent scores; selection adds the non-learned buffer
    e_score_correction_bias, which the weights ignore: DeepSeek-V3's auxiliary-loss-free balancing,
    used by NemotronH). normalize_topk: divide the k weights by their sum; None picks the published
    convention: True for sigmoid (DeepSeek-V3) and for softmax with top_k > 1 (Mixtral), False for
    softmax top-1 (Switch, MoE-Mamba: renormalising one weight would make it 1 and cut the router off
    from the loss). routed_scaling_factor: multiplies the routed output (DeepSeek-V3: 2.5).
    shared_expert_d_ff: width of an always-on MLP added to the routed output (None = none).
    load_balancing_coef, z_loss_coef: weights of the auxiliary losses returned by forward.

    Params: router.weight [num_experts, d_model]; experts.{gate_proj, up_proj} [E, d_model, d_ff],
    experts.down_proj [E, d_ff, d_model]; shared_expert.* (an MLP). Buffer: e_score_correction_bias
    [num_experts] (sigmoid router only; updated by whoever balances the load, never by the optimiser).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int = 2, activation: str = "swiglu",
                 router: str = "softmax", normalize_topk: bool | None = None, routed_scaling_factor: float = 1.0,
                 shared_expert_d_ff: int | None = None, load_balancing_coef: float = 0.01,
                 z_loss_coef: float = 0.001, bias: bool = False, device=None, dtype=None):
        super().__init__()
        check_positive(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}: a token cannot visit more "
                             f"experts than exist")
        if router not in ROUTERS:
            raise ValueError(f"router={router!r} is not supported: use one of {', '.join(ROUTERS)}")
        activation_fn(activation)
        if shared_expert_d_ff is not None:
            check_positive(shared_expert_d_ff=shared_expert_d_ff)
        for name, value in (("load_balancing_coef", load_balancing_coef), ("z_loss_coef", z_loss_coef)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0 (0 switches the loss off)")
        if normalize_topk is None:
            normalize_topk = router == "sigmoid" or top_k > 1
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.router_type, self.normalize_topk = router, normalize_topk
        self.routed_scaling_factor = routed_scaling_factor
        self.load_balancing_coef, self.z_loss_coef = load_balancing_coef, z_loss_coef
        factory = {"device": device, "dtype": dtype}
        self.router = nn.Linear(d_model, num_experts, bias=False, **factory)
        self.experts = GroupedExperts(num_experts, d_model, d_ff, activation, bias, **factory)
        self.shared_expert = (MLP(d_model, shared_expert_d_ff, activation, bias, **factory)
                              if shared_expert_d_ff is not None else None)
        if router == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device,
                                                                       dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Router and experts ~ N(0, 0.02^2), biases zero, selection bias zero."""
        nn.init.normal_(self.router.weight, std=INIT_STD)
        self.experts.reset_parameters()
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters()
        if self.router_type == "sigmoid":
            nn.init.zeros_(self.e_score_correction_bias)

    def route(self, x_flat: torch.Tensor):
        """x_flat: [tokens, d_model] -> (logits [tokens, E] fp32, probs [tokens, E] fp32 (rows sum to 1,
        used by the balancing loss), topk_ids [tokens, k], topk_weights [tokens, k] fp32)."""
        logits = self.router(x_flat).float()
        if self.router_type == "softmax":
            scores = torch.softmax(logits, dim=-1)
            topk_weights, topk_ids = scores.topk(self.top_k, dim=-1)
            probs = scores
        else:
            scores = torch.sigmoid(logits)
            _, topk_ids = (scores + self.e_score_correction_bias.float()).topk(self.top_k, dim=-1)
            topk_weights = scores.gather(-1, topk_ids)
            probs = scores / scores.sum(-1, keepdim=True)
        if self.normalize_topk:
            topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return logits, probs, topk_ids, topk_weights * self.routed_scaling_factor

    def forward(self, x: torch.Tensor, *, state=None, seq_idx=None):
        """x: [batch, seqlen, d_model] -> (y [batch, seqlen, d_model], aux dict of weighted scalar losses).

        Routing is per token, so state and seq_idx change nothing (accepted for the layer contract).
        """
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE expects last dimension d_model={self.d_model}, got input {tuple(x.shape)}")
        x_flat = x.reshape(-1, self.d_model)  # [tokens, d_model]
        tokens, k = x_flat.shape[0], self.top_k
        logits, probs, topk_ids, topk_weights = self.route(x_flat)

        # Sort the tokens * k slots by expert; stable so each expert's slice keeps token order.
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)  # [tokens * k]
        counts = torch.bincount(flat_ids, minlength=self.num_experts)  # [E]
        x_sorted = x_flat[order // k]  # [tokens * k, d_model]
        y_sorted = self.experts(x_sorted, counts, flat_ids[order])

        # Unsort (a permutation, no atomics) and sum each token's k outputs with its router weights.
        y_slots = torch.empty_like(y_sorted)
        y_slots[order] = y_sorted
        y = (y_slots.view(tokens, k, self.d_model).float() * topk_weights[..., None]).sum(1).to(x.dtype)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x_flat)
        aux = {"load_balancing_loss": self.load_balancing_coef * load_balancing_loss(probs, topk_ids, self.num_experts),
               "router_z_loss": self.z_loss_coef * router_z_loss(logits)}
        return y.view_as(x), aux

    def init_state(self, batch_size: int, *, dtype=None, device=None, **kwargs) -> None:
        """Per-token routing: nothing to carry between calls."""
        return None

    def extra_repr(self) -> str:
        return (f"router={self.router_type!r}, top_k={self.top_k}, normalize_topk={self.normalize_topk}, "
                f"routed_scaling_factor={self.routed_scaling_factor}")
