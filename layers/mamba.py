"""Mamba-1 mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"),
parameter-compatible with mamba_ssm's Mamba (and, with inner norms, Jamba's and Falcon Mamba's
mixers; with n_heads > 1, Zamba's multi-head mixer), with an inference state that continues for any
number of new tokens.

x: [batch, seqlen, d_model] -> y: [batch, seqlen, d_model]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.backend import resolve_backend
from kernels.causal_conv1d import causal_conv1d
from kernels.selective_scan import selective_scan_fn
from kernels.selective_scan.step import selective_state_update

from .norm import RMSNorm

INNER_NORMS = (None, "learned", "weightless")
DT_INITS = ("random", "constant")


@dataclass
class MambaState:
    """What a Mamba layer carries between calls; updated in place by forward.

    conv_state: [batch, d_inner, d_conv - 1], the last inputs of the causal conv (layer dtype).
    ssm_state:  [batch, d_inner, d_state], the selective-scan state (float32; float64 for float64 layers).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """The scan's parameters in float32 whatever the layer dtype (float64 layers stay float64)."""
    return t if t.dtype == torch.float64 else t.float()


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"Mamba: {name}={value!r} must be a positive integer")


class Mamba(nn.Module):
    """Mamba-1 mixer: input projection to (x, z), short causal conv + silu on x, input-dependent
    dt, B, C from x_proj, selective scan with a diagonal A per channel, gate silu(z), output projection.

    d_model: model width. d_state: SSM state size per channel (N). d_conv: causal conv width.
    expand: d_inner = expand * d_model. dt_rank: width of the low-rank dt projection ("auto" =
      ceil(d_model / 16)).
    dt_min, dt_max, dt_init_floor: dt_proj.bias is initialised so softplus(bias) is log-uniform in
      [dt_min, dt_max] (at least dt_init_floor). dt_init: "random" (dt_proj.weight ~ uniform(+-s)) or
      "constant" (all s), with s = dt_rank^-0.5 * dt_scale.
    conv_bias: bias on conv1d. bias: biases on in_proj and out_proj.
    inner_norms: None, "learned" (Jamba: RMSNorm with weights on dt, B and C after x_proj) or
      "weightless" (Falcon Mamba: the same norms without weights). norm_eps: their epsilon.
    n_heads: Zamba's multi-head Mamba-1 (transformers' n_mamba_heads). The d_inner channels split
      into n_heads heads of headdim = d_inner / n_heads channels; each head has its own x_proj and
      dt_proj and its own B and C (the groups of the selective scan). With n_heads = 1 (default) the
      parameters are mamba_ssm's x_proj / dt_proj Linears; with n_heads > 1 they are (as in
      transformers' ZambaMambaMixer) x_proj_weight [n_heads, dt_rank + 2 d_state, headdim],
      dt_proj_weight [n_heads, headdim, dt_rank] and dt_proj_bias [n_heads, headdim]. A_log
      [d_inner, d_state] and D [d_inner] keep their shapes (head h owns channels h * headdim to
      (h + 1) * headdim - 1).
    backend: kernel backend ("auto" | "reference" | "fused"; None follows HYBRID_ZOO_KERNELS).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, inner_norms: str | None = None,
                 norm_eps: float = 1e-6, n_heads: int = 1, backend: str | None = None, device=None,
                 dtype=None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("n_heads", n_heads)):
            _positive_int(name, value)
        d_inner = expand * d_model if isinstance(expand, (int, float)) and not isinstance(expand, bool) else None
        if d_inner is None or expand <= 0 or d_inner != int(d_inner):
            raise ValueError(f"Mamba: expand={expand!r} must be a positive number making expand * d_model "
                             f"a whole number (d_model={d_model})")
        d_inner = int(d_inner)
        if d_inner % n_heads:
            raise ValueError(f"Mamba: n_heads={n_heads} must divide d_inner = expand * d_model = {d_inner}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif not isinstance(dt_rank, int) or isinstance(dt_rank, bool) or dt_rank <= 0:
            raise ValueError(f"Mamba: dt_rank={dt_rank!r} must be a positive integer or 'auto' "
                             f"(= ceil(d_model / 16))")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_init not in DT_INITS:
            raise ValueError(f"Mamba: dt_init={dt_init!r} must be one of {', '.join(DT_INITS)}")
        if not dt_scale > 0:
            raise ValueError(f"Mamba: dt_scale={dt_scale!r} must be positive (it scales dt_proj's init)")
        if dt_init_floor < 0:
            raise ValueError(f"Mamba: dt_init_floor={dt_init_floor!r} must be >= 0")
        if inner_norms not in INNER_NORMS:
            raise ValueError(f"Mamba: inner_norms={inner_norms!r} must be null, 'learned' (Jamba) or "
                             f"'weightless' (Falcon Mamba)")
        if not norm_eps > 0:
            raise ValueError(f"Mamba: norm_eps={norm_eps!r} must be positive")
        if backend is not None:
            resolve_backend(backend)

        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner, self.dt_rank = d_inner, dt_rank
        self.n_heads, self.headdim = n_heads, d_inner // n_heads
        self.dt_min, self.dt_max, self.dt_init, self.dt_scale = dt_min, dt_max, dt_init, dt_scale
        self.dt_init_floor, self.inner_norms, self.backend = dt_init_floor, inner_norms, backend

        factory = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias, **factory)         # -> x | z
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        if n_heads == 1:
            self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, **factory)  # -> dt | B | C
            self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **factory)
        else:   # block-diagonal per head: head h's channels -> its own dt | B | C, its dt -> its channels
            self.x_proj_weight = nn.Parameter(torch.empty(n_heads, dt_rank + 2 * d_state, self.headdim, **factory))
            self.dt_proj_weight = nn.Parameter(torch.empty(n_heads, self.headdim, dt_rank, **factory))
            self.dt_proj_bias = nn.Parameter(torch.empty(n_heads, self.headdim, **factory))
        if inner_norms is not None:
            learned = inner_norms == "learned"
            self.dt_layernorm = RMSNorm(dt_rank, eps=norm_eps, weight=learned, **factory)
            self.b_layernorm = RMSNorm(d_state, eps=norm_eps, weight=learned, **factory)
            self.c_layernorm = RMSNorm(d_state, eps=norm_eps, weight=learned, **factory)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state, **factory))
        self.D = nn.Parameter(torch.empty(d_inner, **factory))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)
        self.reset_parameters()

    def _dt_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """dt_proj's weight and bias: dt_proj.weight / dt_proj.bias, or with n_heads > 1
        dt_proj_weight / dt_proj_bias."""
        if self.n_heads == 1:
            return self.dt_proj.weight, self.dt_proj.bias
        return self.dt_proj_weight, self.dt_proj_bias

    def _mark_no_weight_decay(self) -> None:
        """Flag A_log, D and the dt bias (dt_proj.bias, or dt_proj_bias with n_heads > 1) for the
        trainer (no weight decay: their values set time scales) and for the model init (keep the bias)."""
        for p in (self.A_log, self.D, self._dt_weight_and_bias()[1]):
            p._no_weight_decay = True

    def _apply(self, fn, recurse=True):
        # to_empty() from the meta device (and some .to() conversions) replace the Parameter
        # objects, dropping attributes set on them: mark them again.
        module = super()._apply(fn, recurse)
        self._mark_no_weight_decay()
        return module

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's init: default nn.Linear / nn.Conv1d init for in_proj, conv1d, x_proj,
        out_proj; dt_proj.weight ~ uniform(+-s) ("random") or = s ("constant"), s = dt_rank^-0.5 *
        dt_scale; dt_proj.bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at
        dt_init_floor; A_log[d, n] = log(n + 1) (S4D-real: A = -(1, 2, ..., d_state) per channel);
        D = 1; inner norm weights = 1. With n_heads > 1 the same per head: x_proj_weight[h] ~
        uniform(+-headdim^-0.5) (nn.Linear's default for a headdim-wide input), dt_proj_weight and
        dt_proj_bias as dt_proj's. Marks A_log, D and the dt bias with `_no_weight_decay`."""
        self._mark_no_weight_decay()
        if self.n_heads == 1:
            modules = (self.in_proj, self.conv1d, self.x_proj, self.out_proj)
        else:
            modules = (self.in_proj, self.conv1d, self.out_proj)
            self.x_proj_weight.uniform_(-self.headdim ** -0.5, self.headdim ** -0.5)
        for module in modules:
            module.reset_parameters()
        dt_weight, dt_bias = self._dt_weight_and_bias()
        std = self.dt_rank ** -0.5 * self.dt_scale
        if self.dt_init == "constant":
            dt_weight.fill_(std)
        else:
            dt_weight.uniform_(-std, std)
        device = self.A_log.device
        log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.d_inner, device=device) * (log_hi - log_lo) + log_lo)
        dt = dt.clamp(min=self.dt_init_floor)
        # inverse of softplus: dt + log(1 - exp(-dt)), so that softplus(bias) == dt
        dt_bias.copy_((dt + torch.log(-torch.expm1(-dt))).view(dt_bias.shape))
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, self.d_state))
        self.D.fill_(1.0)
        if self.inner_norms == "learned":
            for norm in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
                norm.weight.fill_(1.0)

    def init_state(self, batch_size: int, *, dtype=None, device=None, **unused) -> MambaState:
        """A zero state for `batch_size` sequences. Other keywords (such as attention's maximum
        length) are accepted and ignored: a Mamba state has a fixed size."""
        _positive_int("batch_size", batch_size)
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return MambaState(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, dtype=dtype, device=device),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, dtype=ssm_dtype, device=device))

    def forward(self, x: torch.Tensor, *, state: MambaState | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x [batch, seqlen, d_model] -> y [batch, seqlen, d_model].

        state: continue from it (any number of tokens) and update it in place. seq_idx: int32
        [batch, seqlen] document ids; with a state, the state continues the first token's document
        and ends as the last token's.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba: x must be [batch, seqlen, d_model={self.d_model}], got {tuple(x.shape)}")
        xs, z = self.in_proj(x).chunk(2, dim=-1)                             # [b, l, d_inner] each
        return self.out_proj(self.ssm(xs, z, state=state, seq_idx=seq_idx))

    def ssm(self, xs: torch.Tensor, z: torch.Tensor | None, *, state: MambaState | None = None,
            seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Everything between in_proj and out_proj: xs, z [batch, seqlen, d_inner] -> y [batch,
        seqlen, d_inner] (conv, x_proj, dt_proj, scan, gate silu(z); no gate when z is None).
        Separate so that a bidirectional wrapper can share in_proj and out_proj across directions."""
        batch, seqlen, _ = xs.shape
        if state is not None and state.ssm_state.shape != (batch, self.d_inner, self.d_state):
            raise ValueError(f"Mamba: state has shape {tuple(state.ssm_state.shape)} but this input needs "
                             f"[batch={batch}, d_inner={self.d_inner}, d_state={self.d_state}]; "
                             f"call init_state({batch})")
        xs = causal_conv1d(xs, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                           conv_state=None if state is None else state.conv_state, seq_idx=seq_idx,
                           backend=self.backend)                              # [b, l, d_inner]
        split = [self.dt_rank, self.d_state, self.d_state]
        if self.n_heads == 1:
            dt, B, C = self.x_proj(xs).split(split, dim=-1)                  # B, C [b, l, d_state]
            dt_bias = self.dt_proj.bias
        else:
            heads = xs.view(batch, seqlen, self.n_heads, self.headdim)
            dt, B, C = torch.einsum("blhp,hkp->blhk", heads, self.x_proj_weight).split(split, dim=-1)
            dt_bias = self.dt_proj_bias.reshape(self.d_inner)                # B, C [b, l, n_heads, d_state]
        if self.inner_norms is not None:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        # dt_proj without its bias: the bias goes into the scan as delta_bias, added before softplus
        if self.n_heads == 1:
            dt = F.linear(dt, self.dt_proj.weight)                            # [b, l, d_inner]
        else:
            dt = torch.einsum("blhr,hpr->blhp", dt, self.dt_proj_weight).reshape(batch, seqlen, self.d_inner)
        A = -torch.exp(_fp32(self.A_log))                                     # [d_inner, d_state], < 0
        if state is not None and seqlen == 1 and xs.is_cuda and resolve_backend(self.backend) != "reference":
            # one token continuing a state (decode): the fused single-step update, in place
            y = selective_state_update(state.ssm_state, xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0],
                                       D=_fp32(self.D), z=None if z is None else z[:, 0],
                                       dt_bias=_fp32(dt_bias), dt_softplus=True)
            return y.unsqueeze(1)                                             # [b, 1, d_inner]
        # B, C: [b, l, d_state] -> [b, d_state, l], or per head [b, l, n_heads, d_state] -> [b, n_heads,
        # d_state, l] (head h's B and C serve its channels: the scan's groups)
        out = selective_scan_fn(
            xs.transpose(1, 2), dt.transpose(1, 2), A, B.movedim(1, -1), C.movedim(1, -1),
            D=_fp32(self.D), z=None if z is None else z.transpose(1, 2),
            delta_bias=_fp32(dt_bias), delta_softplus=True,
            return_last_state=state is not None,
            initial_state=None if state is None else state.ssm_state, seq_idx=seq_idx,
            backend=self.backend)                                             # [b, d_inner, l]
        if state is not None:
            out, last_state = out
            state.ssm_state.copy_(last_state)
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        heads = f", n_heads={self.n_heads}" if self.n_heads > 1 else ""
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"d_conv={self.d_conv}, dt_rank={self.dt_rank}, inner_norms={self.inner_norms}{heads}")
