"""hybrid-zoo: the layout language, models, tasks, training, ablation, generation, checkpoints, CLI.

Public API (imported lazily so that `zoo --help` stays fast):
    zoo.build_model(path_or_dict, **overrides) -> nn.Module
    zoo.load_config(path_or_dict, **overrides) -> dict   (the validated, expanded config)
    zoo.from_pretrained(path) -> nn.Module               (zoo or Hugging Face checkpoint directory)
"""
from __future__ import annotations

import importlib

_LAZY = {
    "build_model": "zoo.models",
    "load_config": "zoo.layout",
    "expand_layout": "zoo.layout",
    "LayoutError": "zoo.layout",
    "from_pretrained": "zoo.checkpoint",
    "save_pretrained": "zoo.checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
