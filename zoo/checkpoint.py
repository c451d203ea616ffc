"""Checkpoints: the zoo's pretrained format and training checkpoints, written atomically.

Zoo format (what `save_pretrained` writes and `from_pretrained` reads):

    DIR/config.yaml          the model's full expanded config (`model.config`; rebuilds the model)
    DIR/model.safetensors    the weights; tensors shared between modules are stored once

A training checkpoint is a zoo-format directory plus `training_state.pt` (optimizer, scheduler,
RNG states of every process, step = data position, task state) and `run.yaml` (the run config):

    RUN/checkpoints/step_00000100/{config.yaml, model.safetensors, training_state.pt, run.yaml}
    RUN/checkpoints/latest       the name of the newest complete checkpoint

Every directory is written under a temporary name, each file fsync'ed, then renamed into place
with `os.replace`, and `latest` is replaced the same way afterwards: a run killed at any moment
leaves the previous checkpoint whole and `latest` pointing at a complete one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import torch
import yaml

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TRAINING_FILE = "training_state.pt"
RUN_FILE = "run.yaml"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
_ALIASES_KEY = "zoo.aliases"


# ---------------------------------------------------------------- atomic files and directories

def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root)


@contextlib.contextmanager
def atomic_directory(final: str) -> Iterator[str]:
    """Yield a temporary directory beside `final`; on success fsync it and rename it to `final`.

    On an exception the temporary directory is removed and `final` is untouched. An existing
    `final` is moved aside first (a directory cannot be replaced by rename while non-empty), then
    deleted once the new one is in place.
    """
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=parent)
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(final)}-", dir=parent)
            os.replace(final, os.path.join(old, "d"))
        os.replace(tmp, final)
        _fsync_path(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a mix."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------- weights

def save_weights(state_dict: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict to safetensors; tensors sharing storage (tied or shared weights) are stored
    once and the other names recorded as aliases in the metadata."""
    from safetensors.torch import save_file

    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, t in state_dict.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        t = t.to("cpu")
        # safetensors refuses overlapping storage: a different view of a stored tensor is copied
        tensors[name] = t.clone() if ptr in storages or not t.is_contiguous() else t
        storages.add(ptr)
    meta = dict(metadata or {})
    meta[_ALIASES_KEY] = json.dumps(aliases)
    save_file(tensors, path, metadata=meta)


def load_weights(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file written by `save_weights`, restoring aliased names."""
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt", device=str(device)) as f:
        for name in f.keys():
            out[name] = f.get_tensor(name)
        aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    for alias, name in aliases.items():
        out[alias] = out[name]
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _model_config(model: torch.nn.Module) -> dict:
    config = getattr(_unwrap(model), "config", None)
    if not isinstance(config, dict):
        raise ValueError("save_pretrained: the model has no `config` dict; build it with zoo.build_model "
                         "so that the checkpoint can rebuild it")
    return config


def _write_config(config: dict, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------- zoo format

def save_pretrained(model: torch.nn.Module, directory: str, *, state_dict: dict | None = None) -> str:
    """Save `model` in the zoo format (config.yaml + model.safetensors), atomically.

    state_dict: the weights to write when they do not live on this process as a plain module
    (a gathered FSDP state dict); by default `model.state_dict()`.
    """
    config = _model_config(model)
    sd = state_dict if state_dict is not None else _unwrap(model).state_dict()
    with atomic_directory(directory) as tmp:
        _write_config(config, os.path.join(tmp, CONFIG_FILE))
        save_weights(sd, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "hybrid-zoo"})
    return directory


def is_zoo_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(os.path.join(path, WEIGHTS_FILE))


def from_pretrained(path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a model from a zoo checkpoint directory, a training run directory (its newest
    checkpoint), or a Hugging Face checkpoint directory (config.json + safetensors; zoo/hf.py).
    Returns the model in eval mode on `device`.
    """
    if not os.path.isdir(path):
        raise ValueError(f"from_pretrained: {path!r} is not a directory; give a directory holding "
                         f"{CONFIG_FILE} + {WEIGHTS_FILE}, or a training run directory")
    resolved = path
    if not is_zoo_checkpoint(path):
        latest = latest_checkpoint(path)
        if latest is not None:
            resolved = latest
    if is_zoo_checkpoint(resolved):
        return _load_zoo(resolved, device=device, dtype=dtype)
    if os.path.isfile(os.path.join(path, "config.json")):
        from zoo.hf import is_hf_checkpoint, load_hf

        if not is_hf_checkpoint(path):
            raise ValueError(f"from_pretrained: {path!r} has a config.json without a model_type, so it is "
                             f"not a Hugging Face checkpoint the zoo can read; expected {CONFIG_FILE} + "
                             f"{WEIGHTS_FILE} (zoo format) or an HF directory")
        model = load_hf(path, device=device, dtype=dtype)
        return model.eval()
    raise ValueError(f"from_pretrained: {path!r} is not a checkpoint: expected {CONFIG_FILE} + {WEIGHTS_FILE} "
                     f"(zoo format), a training run with {CHECKPOINTS_DIR}/{LATEST_FILE}, or config.json "
                     f"(Hugging Face)")


def _load_zoo(path: str, *, device, dtype) -> torch.nn.Module:
    from zoo.models import build_model

    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = yaml.safe_load(f)
    model = build_model(config)
    sd = load_weights(os.path.join(path, WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"from_pretrained: {path}/{WEIGHTS_FILE} does not match {CONFIG_FILE}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------- training checkpoints

def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in (CONFIG_FILE, WEIGHTS_FILE, TRAINING_FILE))


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete training checkpoint of a run directory (or None): the one `latest`
    names, else the highest step among complete ones."""
    root = os.path.join(run_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return None
    pointer = os.path.join(root, LATEST_FILE)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            cand = os.path.join(root, f.read().strip())
        if _complete(cand):
            return cand
    names = sorted((n for n in os.listdir(root) if n.startswith("step_")), reverse=True)
    for name in names:
        if _complete(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def save_training_checkpoint(run_dir: str, step: int, *, model_config: dict, model_state: dict,
                             training_state: dict[str, Any], run_config: dict | None = None,
                             keep: int = 2) -> str:
    """Write RUN/checkpoints/step_XXXXXXXX atomically, point `latest` at it, keep the newest `keep`.

    training_state: optimizer / scheduler state dicts, RNG states, step and anything else picklable
    by torch.save with weights_only loading (tensors, numbers, strings, lists, dicts).
    """
    root = os.path.join(run_dir, CHECKPOINTS_DIR)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):            # leftovers of a run killed mid-write
        if name.startswith((".tmp-", ".old-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    name = checkpoint_name(step)
    final = os.path.join(root, name)
    with atomic_directory(final) as tmp:
        _write_config(model_config, os.path.join(tmp, CONFIG_FILE))
        save_weights(model_state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "hybrid-zoo", "step": str(step)})
        if run_config is not None:
            with open(os.path.join(tmp, RUN_FILE), "w") as f:
                yaml.safe_dump(run_config, f, sort_keys=False)
        torch.save(training_state, os.path.join(tmp, TRAINING_FILE))
    atomic_write_text(os.path.join(root, LATEST_FILE), name + "\n")
    steps = sorted(n for n in os.listdir(root) if n.startswith("step_") and _complete(os.path.join(root, n)))
    for old in steps[:-keep] if keep > 0 else []:
        if old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def load_training_checkpoint(path: str) -> dict[str, Any]:
    """{'config': model config, 'model_state': weights, 'training_state': ...} of one checkpoint dir."""
    if not _complete(path):
        raise ValueError(f"{path} is not a complete training checkpoint (needs {CONFIG_FILE}, {WEIGHTS_FILE}, "
                         f"{TRAINING_FILE})")
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = yaml.safe_load(f)
    return {"config": config, "model_state": load_weights(os.path.join(path, WEIGHTS_FILE)),
            "training_state": torch.load(os.path.join(path, TRAINING_FILE), map_location="cpu", weights_only=True)}
