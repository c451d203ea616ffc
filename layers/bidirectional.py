"""Bidirectional sequence mixing for encoders such as Vision Mamba (Zhu et al., 2024).

Two ways to let a causal mixer see both directions:

- `Bidirectional(d_model, mixer={type, **kwargs}, combine)`: a generic wrapper. `mixer` runs on the
  sequence, a second, independent copy `mixer_b` runs on the flipped sequence and its output is
  flipped back; the two are averaged (combine="mean") or added ("sum").
- `BiMamba(d_model, ..., combine)`: Vision Mamba's "v2" Mamba with Vim's parameter sharing and names:
  in_proj and out_proj are shared by both directions; the backward direction has its own conv1d_b,
  x_proj_b, dt_proj_b, A_b_log, D_b. With xs, z = in_proj(x):
      y = out_proj(combine(ssm(xs, z), flip(ssm_b(flip(xs), flip(z)))))
  combine="mean" divides the sum by two (Vim's `if_divide_out=True`, which its released models use).

x: [batch, seqlen, d_model] -> y: [batch, seqlen, d_model]. Neither has an incremental state: the
output at each position depends on the future.
"""
from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from .mamba import Mamba

COMBINES = ("mean", "sum")

# the causal mixers the generic wrapper can build (the zoo registry's names for them)
_MIXERS = {"mamba": "layers.mamba:Mamba", "mamba2": "layers.mamba2:Mamba2",
           "attention": "layers.attention:Attention"}


def flip_seq_idx(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """Document ids of the flipped sequence, again non-decreasing from 0: [b, l] -> [b, l]."""
    if seq_idx is None:
        return None
    return (seq_idx[:, -1:] - seq_idx).flip(1).to(seq_idx.dtype)


def _combine(a: torch.Tensor, b: torch.Tensor, combine: str) -> torch.Tensor:
    return (a + b) / 2 if combine == "mean" else a + b


def _check_combine(combine: str) -> None:
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} must be 'mean' (average the two directions, Vim) or 'sum'")


class Bidirectional(nn.Module):
    """Any causal mixer run forward (`mixer`) and on the flipped sequence (`mixer_b`, its own weights).

    d_model: width. mixer: {"type": "mamba" | "mamba2" | "attention", **its kwargs}. combine: "mean" | "sum".
    """

    def __init__(self, d_model: int, mixer: dict, combine: str = "mean", device=None, dtype=None):
        super().__init__()
        _check_combine(combine)
        if not isinstance(mixer, dict) or mixer.get("type") not in _MIXERS:
            raise ValueError(f"mixer={mixer!r} must be a mapping with type one of {', '.join(_MIXERS)} "
                             f"and that layer's kwargs")
        kwargs = {k: v for k, v in mixer.items() if k != "type"}
        if kwargs.setdefault("d_model", d_model) != d_model:
            raise ValueError(f"mixer.d_model={kwargs['d_model']} must equal d_model={d_model}")
        if mixer["type"] == "attention" and kwargs.get("causal", True) is False:
            raise ValueError("mixer: attention with causal=False already sees both directions; use it "
                             "directly instead of wrapping it")
        module_name, class_name = _MIXERS[mixer["type"]].split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        self.d_model, self.combine = d_model, combine
        self.mixer = cls(**kwargs, device=device, dtype=dtype)
        self.mixer_b = cls(**kwargs, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.mixer.reset_parameters()
        self.mixer_b.reset_parameters()

    def init_state(self, batch_size: int, *, dtype=None, device=None, **kwargs):
        raise ValueError("Bidirectional: a bidirectional mixer reads the future, so it has no incremental "
                         "state; run whole sequences")

    def forward(self, x: torch.Tensor, *, state=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        if state is not None:
            raise ValueError("Bidirectional: state= is not supported (the output depends on later tokens)")
        y = self.mixer(x, seq_idx=seq_idx)
        y_b = self.mixer_b(x.flip(1), seq_idx=flip_seq_idx(seq_idx)).flip(1)
        return _combine(y, y_b, self.combine)

    def extra_repr(self) -> str:
        return f"combine={self.combine}"


class BiMamba(Mamba):
    """Vision Mamba "v2" mixer (bimamba_type="v2"): Mamba-1 with shared in_proj / out_proj and a
    backward direction of its own conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b (Vim's names).

    Arguments as layers.mamba.Mamba, plus combine: "mean" (Vim) or "sum".
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, inner_norms: str | None = None,
                 norm_eps: float = 1e-6, combine: str = "mean", n_heads: int = 1, backend: str | None = None,
                 device=None, dtype=None):
        _check_combine(combine)
        if n_heads != 1:
            raise ValueError(f"BiMamba: n_heads={n_heads!r}: the bidirectional mixer has single-head "
                             f"x_proj/dt_proj; use n_heads: 1 (or the generic `bidirectional` wrapper)")
        self._building = True       # Mamba.__init__ calls reset_parameters before the _b params exist
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                         dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
                         dt_init_floor=dt_init_floor, conv_bias=conv_bias, bias=bias,
                         inner_norms=inner_norms, norm_eps=norm_eps, backend=backend,
                         device=device, dtype=dtype)
        self.combine = combine
        factory = dict(device=device, dtype=dtype)
        d_inner = self.d_inner
        self.conv1d_b = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1,
                                  bias=conv_bias, **factory)
        self.x_proj_b = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj_b = nn.Linear(self.dt_rank, d_inner, bias=True, **factory)
        self.A_b_log = nn.Parameter(torch.empty(d_inner, d_state, **factory))
        self.D_b = nn.Parameter(torch.empty(d_inner, **factory))
        if inner_norms is not None:
            # the inner norms (if any) act on dt, B, C of each direction: give the backward its own
            self.dt_layernorm_b = type(self.dt_layernorm)(self.dt_rank, eps=norm_eps,
                                                          weight=inner_norms == "learned", **factory)
            self.b_layernorm_b = type(self.b_layernorm)(d_state, eps=norm_eps, weight=inner_norms == "learned", **factory)
            self.c_layernorm_b = type(self.c_layernorm)(d_state, eps=norm_eps, weight=inner_norms == "learned", **factory)
        for p in (self.A_b_log, self.D_b, self.dt_proj_b.bias):
            p._no_weight_decay = True
        self._building = False
        self.reset_parameters()

    def _mark_no_weight_decay(self) -> None:
        """Mamba's flags, and the same for the backward direction's A, D and dt bias (to_empty() from
        meta replaces Parameters and drops their attributes; Mamba._apply marks them again)."""
        super()._mark_no_weight_decay()
        if hasattr(self, "A_b_log"):            # absent while Mamba.__init__ runs
            for p in (self.A_b_log, self.D_b, self.dt_proj_b.bias):
                p._no_weight_decay = True

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's init for the shared and forward parameters, and the same scheme for the backward
        ones: default init of conv1d_b and x_proj_b; dt_proj_b.weight ~ uniform(+-dt_rank^-0.5 *
        dt_scale) (or constant); dt_proj_b.bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max];
        A_b_log = log(1..d_state) per channel; D_b = 1."""
        super().reset_parameters()
        if getattr(self, "_building", False):
            return
        self.conv1d_b.reset_parameters()
        self.x_proj_b.reset_parameters()
        s = self.dt_rank ** -0.5 * self.dt_scale
        if self.dt_init == "constant":
            self.dt_proj_b.weight.fill_(s)
        else:
            self.dt_proj_b.weight.uniform_(-s, s)
        device = self.A_b_log.device
        log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.d_inner, device=device) * (log_hi - log_lo) + log_lo)
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_proj_b.bias.copy_(dt + torch.log(-torch.expm1(-dt)))     # softplus(bias) == dt
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        self.A_b_log.copy_(torch.log(A).expand(self.d_inner, self.d_state))
        self.D_b.fill_(1.0)
        if self.inner_norms == "learned":
            for norm in (self.dt_layernorm_b, self.b_layernorm_b, self.c_layernorm_b):
                norm.weight.fill_(1.0)

    def _backward_direction(self) -> "_Renamed":
        """This layer with the backward parameters under the forward names, so Mamba.ssm runs them
        unchanged (every other attribute is read from the layer itself)."""
        names = {"conv1d": self.conv1d_b, "x_proj": self.x_proj_b, "dt_proj": self.dt_proj_b,
                 "A_log": self.A_b_log, "D": self.D_b}
        if self.inner_norms is not None:
            names.update(dt_layernorm=self.dt_layernorm_b, b_layernorm=self.b_layernorm_b,
                         c_layernorm=self.c_layernorm_b)
        return _Renamed(self, names)

    def init_state(self, batch_size: int, *, dtype=None, device=None, **kwargs):
        raise ValueError("BiMamba: a bidirectional mixer reads the future, so it has no incremental state; "
                         "run whole sequences")

    def forward(self, x: torch.Tensor, *, state=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        if state is not None:
            raise ValueError("BiMamba: state= is not supported (the output depends on later tokens)")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"BiMamba: x must be [batch, seqlen, d_model={self.d_model}], got {tuple(x.shape)}")
        xs, z = self.in_proj(x).chunk(2, dim=-1)                                   # [b, l, d_inner]
        y = self.ssm(xs, z, seq_idx=seq_idx)
        y_b = Mamba.ssm(self._backward_direction(), xs.flip(1), z.flip(1),
                        seq_idx=flip_seq_idx(seq_idx)).flip(1)
        return self.out_proj(_combine(y, y_b, self.combine))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", combine={self.combine}"


class _Renamed:
    """A read-only view of `owner` in which some attribute names point at other objects."""

    def __init__(self, owner, names: dict):
        self.__dict__.update(names)
        self._owner = owner

    def __getattr__(self, name):                 # only called for names not set in __init__
        return getattr(self._owner, name)
