"""Layer-type names used in model YAML -> the layer classes that implement them.

Classes are imported on first use, so that `zoo --help` and config validation of unrelated types do
not import every layer. `register(name, "module:Class")` adds a type (e.g. an experimental mixer).
"""
from __future__ import annotations

import difflib
import importlib

# name -> "module:Class"; see docs/CONTRACTS.md for the kwargs each accepts
_TYPES: dict[str, str] = {
    "mamba": "layers.mamba:Mamba",
    "mamba2": "layers.mamba2:Mamba2",
    "attention": "layers.attention:Attention",
    "mlp": "layers.mlp:MLP",
    "moe": "layers.moe:MoE",
    "bimamba": "layers.bidirectional:BiMamba",
    "bidirectional": "layers.bidirectional:Bidirectional",
}

# the types whose forward returns (y, aux_losses)
RETURNS_AUX = {"moe"}


def names() -> list[str]:
    return list(_TYPES)


def register(name: str, target: str) -> None:
    """Add a layer type: `target` is "package.module:ClassName"."""
    if ":" not in target:
        raise ValueError(f"register({name!r}, {target!r}): target must look like 'package.module:ClassName'")
    _TYPES[name] = target


def get(name: str, *, ctx=None, path: str = ""):
    """The class for a layer-type name; unknown names get a did-you-mean."""
    from zoo.layout import LayoutError

    where = f"{ctx.source}: {path} " if ctx is not None else ""
    if name not in _TYPES:
        close = difflib.get_close_matches(str(name), list(_TYPES), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LayoutError(f"{where}unknown layer type {name!r}{hint}; known: {', '.join(_TYPES)}")
    module_name, class_name = _TYPES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise LayoutError(f"{where}layer type {name!r} needs {module_name}, which this installation "
                          f"lacks") from None
    return getattr(module, class_name)
