"""Feed-forward channel mixers: gated (SwiGLU, GeGLU) and plain (GELU, squared ReLU, SiLU, ReLU) MLPs.

x: [batch, seqlen, d_model] -> y: [batch, seqlen, d_model]; every position is mixed independently, so
there is no inference state and packed documents (seq_idx) cannot leak into each other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (So et al., 2021, "Primer"), the FFN activation of NemotronH."""
    return F.relu(x).square()


# name -> (elementwise function, gated). Gated activations compute act(gate_proj x) * up_proj x
# (Shazeer, 2020, "GLU Variants Improve Transformer"); GELU is the exact erf form, not the tanh one.
ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
    "gelu": (F.gelu, False),
    "relu2": (relu2, False),
    "silu": (F.silu, False),
    "relu": (F.relu, False),
}


def activation_fn(activation: str, arg: str = "activation"):
    """(function, gated) for an activation name; ValueError listing the valid names otherwise."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{arg}={activation!r} is not supported: use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def check_positive(**kwargs) -> None:
    for name, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")


class MLP(nn.Module):
    """Position-wise feed-forward block.

    d_model: model width; d_ff: hidden width; activation: one of ACTIVATIONS ("swiglu" default);
    bias: biases on every projection. Gated activations own gate_proj, up_proj, down_proj, plain ones
    up_proj, down_proj (Hugging Face names, so Llama/Mistral/Jamba/NemotronH checkpoints map).

    x: [..., d_model] -> y: [..., d_model]
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        check_positive(d_model=d_model, d_ff=d_ff)
        self.act, self.gated = activation_fn(activation)
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        factory = {"device": device, "dtype": dtype}
        if self.gated:
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias, **factory)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias, **factory)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ N(0, 0.02^2) (the GPT-2 / Hugging Face `initializer_range`), biases zero."""
        for proj in (getattr(self, "gate_proj", None), self.up_proj, self.down_proj):
            if proj is None:
                continue
            nn.init.normal_(proj.weight, std=INIT_STD)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(self, x: torch.Tensor, *, state=None, seq_idx=None) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MLP expects last dimension d_model={self.d_model}, got input {tuple(x.shape)}")
        if self.gated:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)  # [..., d_ff]
        else:
            h = self.act(self.up_proj(x))
        return self.down_proj(h)

    def init_state(self, batch_size: int, *, dtype=None, device=None, **kwargs) -> None:
        """Position-wise: nothing to carry between calls."""
        return None

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"
