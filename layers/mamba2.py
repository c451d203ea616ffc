"""Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs"), parameter-compatible with mamba_ssm's
Mamba2, with an inference state that continues for any number of new tokens.

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
from kernels.ssd import mamba_chunk_scan_combined, ssd_step

from .norm import GatedRMSNorm


@dataclass
class Mamba2State:
    """What a Mamba-2 layer carries between calls; updated in place by forward.

    conv_state: [batch, conv_dim, d_conv - 1], the last inputs of the causal conv (layer dtype).
    ssm_state:  [batch, nheads, headdim, d_state], the SSD state (float32; float64 for float64 layers).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


def _pair(value, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"Mamba2: {name}={value!r} must be a pair [low, high] of numbers") from None
    if not low <= high:
        raise ValueError(f"Mamba2: {name}={value!r} must have low <= high")
    return low, high


def _number(value, name: str) -> float:
    """A float from a number or a numeric string (PyYAML reads `1e-3`, without a dot, as a string)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Mamba2: {name}={value!r} must be a number") from None


class Mamba2(nn.Module):
    """Mamba-2 mixer: input projection, short causal conv, SSD scan with a scalar decay per head,
    gated RMSNorm, output projection.

    d_model: model width. d_state: SSM state size per head (N). d_conv: causal conv width.
    expand: d_inner = expand * d_model. headdim: channels per head (P); nheads = d_ssm / headdim.
    d_ssm: channels that go through the SSM (default d_inner); the other d_inner - d_ssm channels
      form a gated MLP branch silu(z0) * x0 concatenated before out_proj (mamba_ssm's layout).
    ngroups: groups of heads sharing B and C (like GQA for the SSM); also the norm's groups.
    A_init_range: A = -uniform(A_init_range) per head. D_has_hdim: skip weight D per channel
      instead of per head. rmsnorm: gated RMSNorm on the output (else the gate is silu(z) alone).
    norm_before_gate: RMSNorm(y) * silu(z) instead of RMSNorm(y * silu(z)).
    dt_min, dt_max, dt_init_floor: dt_bias is initialised so softplus(dt_bias) is log-uniform in
      [dt_min, dt_max] (at least dt_init_floor). dt_limit: clamp of dt after softplus.
    bias: biases on in_proj/out_proj. conv_bias: bias on conv1d. chunk_size: SSD chunk length.
    norm_eps: epsilon of the gated RMSNorm. backend: kernel backend ("auto" | "reference" |
      "fused"; None follows HYBRID_ZOO_KERNELS).
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2,
                 headdim: int = 64, d_ssm: int | None = None, ngroups: int = 1,
                 A_init_range: tuple[float, float] = (1, 16), D_has_hdim: bool = False,
                 rmsnorm: bool = True, norm_before_gate: bool = False, dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_limit: tuple[float, float] = (0.0, float("inf")), bias: bool = False,
                 conv_bias: bool = True, chunk_size: int = 256, norm_eps: float = 1e-5,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv),
                            ("headdim", headdim), ("ngroups", ngroups), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Mamba2: {name}={value!r} must be a positive integer")
        d_inner = expand * d_model
        if expand <= 0 or d_inner != int(d_inner):
            raise ValueError(f"Mamba2: expand={expand!r} must be positive and make expand * d_model "
                             f"(= {d_inner}) a whole number")
        d_inner = int(d_inner)
        d_ssm = d_inner if d_ssm is None else d_ssm
        if not isinstance(d_ssm, int) or not 0 < d_ssm <= d_inner:
            raise ValueError(f"Mamba2: d_ssm={d_ssm!r} must be a positive integer <= d_inner = expand * "
                             f"d_model = {d_inner} (or null for d_inner)")
        if d_ssm % headdim:
            raise ValueError(f"Mamba2: d_ssm={d_ssm} (expand * d_model unless set) must be a multiple of "
                             f"headdim={headdim}; change headdim, expand or d_ssm")
        nheads = d_ssm // headdim
        if nheads % ngroups:
            raise ValueError(f"Mamba2: ngroups={ngroups} must divide nheads = d_ssm / headdim = {nheads}; "
                             f"choose ngroups among the divisors of {nheads}")
        self.A_init_range = _pair(A_init_range, "A_init_range")
        if self.A_init_range[0] <= 0:
            raise ValueError(f"Mamba2: A_init_range={A_init_range!r} must be positive (A = -uniform(range))")
        dt_min, dt_max = _number(dt_min, "dt_min"), _number(dt_max, "dt_max")
        dt_init_floor, norm_eps = _number(dt_init_floor, "dt_init_floor"), _number(norm_eps, "norm_eps")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_init_floor < 0:
            raise ValueError(f"Mamba2: dt_init_floor={dt_init_floor} must be >= 0")
        self.dt_limit = _pair(dt_limit, "dt_limit")
        if norm_eps <= 0:
            raise ValueError(f"Mamba2: norm_eps={norm_eps} must be positive")
        if backend is not None:
            resolve_backend(backend)

        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner, self.d_ssm, self.headdim, self.nheads, self.ngroups = d_inner, d_ssm, headdim, nheads, ngroups
        self.d_mlp = d_inner - d_ssm
        self.conv_dim = d_ssm + 2 * ngroups * d_state
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = bool(D_has_hdim), bool(rmsnorm), bool(norm_before_gate)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.chunk_size, self.backend = chunk_size, backend

        factory = dict(device=device, dtype=dtype)
        # in_proj output, in order: [z0 | x0] (MLP branch, d_mlp each) | z (d_ssm) | xBC (conv_dim) | dt (nheads)
        self._split = [self.d_mlp, self.d_mlp, d_ssm, self.conv_dim, nheads]
        self.in_proj = nn.Linear(d_model, sum(self._split), bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.dt_bias = nn.Parameter(torch.empty(nheads, **factory))
        self.A_log = nn.Parameter(torch.empty(nheads, **factory))
        self.D = nn.Parameter(torch.empty(d_ssm if D_has_hdim else nheads, **factory))
        self.norm = (GatedRMSNorm(d_ssm, eps=norm_eps, group_size=d_ssm // ngroups,
                                  norm_before_gate=norm_before_gate, **factory) if rmsnorm else None)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's init: default nn.Linear / nn.Conv1d init; A ~ -uniform(A_init_range) stored
        as A_log; dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored at
        dt_init_floor; D = 1; norm weight = 1. Marks A_log, D, dt_bias with `_no_weight_decay`."""
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        self.out_proj.reset_parameters()
        device = self.A_log.device
        log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.nheads, device=device) * (log_hi - log_lo) + log_lo)
        dt = dt.clamp(min=self.dt_init_floor)
        # inverse of softplus: dt + log(1 - exp(-dt)), so that softplus(dt_bias) == dt
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.nheads, device=device).uniform_(*self.A_init_range)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        if self.norm is not None:
            self.norm.weight.fill_(1.0)
        # set here rather than once in __init__: Module.to_empty may replace the Parameter objects
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def init_state(self, batch_size: int, *, dtype=None, device=None, **unused) -> Mamba2State:
        """A zero state for `batch_size` sequences. Other keywords (such as attention's maximum
        length) are accepted and ignored: a Mamba-2 state has a fixed size."""
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return Mamba2State(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, dtype=dtype, device=device),
            ssm_state=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, dtype=ssm_dtype,
                                  device=device))

    def forward(self, x: torch.Tensor, *, state: Mamba2State | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x [batch, seqlen, d_model] -> y [batch, seqlen, d_model].

        state: continue from it (any number of tokens) and update it in place. seq_idx: int32
        [batch, seqlen] document ids; with a state, the state continues the first token's document.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2: x must be [batch, seqlen, d_model={self.d_model}], got {tuple(x.shape)}")
        batch, seqlen, _ = x.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        if state is not None and state.ssm_state.shape != (batch, h, p, n):
            raise ValueError(f"Mamba2: state was made for batch {state.ssm_state.shape[0]}, input has "
                             f"batch {batch}; call init_state({batch})")

        z0, x0, z, xbc, dt = self.in_proj(x).split(self._split, dim=-1)
        xbc = causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                            conv_state=None if state is None else state.conv_state, seq_idx=seq_idx,
                            backend=self.backend)                             # [b, l, conv_dim]
        xs, B, C = xbc.split([self.d_ssm, g * n, g * n], dim=-1)
        # [h], negative: a decay; at least fp32 (as mamba_ssm), float64 stays float64
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))
        D = self.D.view(h, p) if self.D_has_hdim else self.D
        # without the norm, the gate is applied inside the scan (as mamba_ssm does)
        z_scan = None if self.rmsnorm else z.view(batch, seqlen, h, p)
        scan_kw = dict(D=D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit, backend=self.backend)

        if state is not None and seqlen == 1:
            y = ssd_step(state.ssm_state, xs.view(batch, h, p), dt.view(batch, h), A, B.view(batch, g, n),
                         C.view(batch, g, n), z=None if z_scan is None else z_scan[:, 0], **scan_kw)
        else:
            out = mamba_chunk_scan_combined(
                xs.view(batch, seqlen, h, p), dt, A, B.view(batch, seqlen, g, n), C.view(batch, seqlen, g, n),
                self.chunk_size, z=z_scan, seq_idx=seq_idx,
                initial_states=None if state is None else state.ssm_state,
                return_final_states=state is not None, **scan_kw)
            if state is not None:
                out, final = out
                state.ssm_state.copy_(final)
            y = out
        y = y.reshape(batch, seqlen, self.d_ssm)
        if self.norm is not None:
            y = self.norm(y, z)
        if self.d_mlp:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_ssm={self.d_ssm}, nheads={self.nheads}, "
                f"headdim={self.headdim}, d_state={self.d_state}, ngroups={self.ngroups}, "
                f"d_conv={self.d_conv}, chunk_size={self.chunk_size}")
