"""Run configs: what `zoo train` reads.

A run config is a YAML file (or dict) with three sections:

    model:   a model config dict, or a path to one (configs/models/...); `--set model.x=y` overrides
    task:    a `zoo.tasks.build_task` dict (name + its arguments)
    trainer: the optimisation budget and schedule, `TrainerConfig` below

Overrides are dotted keys with YAML values (`--set trainer.lr=3e-4 --set model.layers.count=4`);
values are parsed with `yaml.safe_load`, so `[0.9, 0.99]`, `true` and `null` work. Unknown keys in
`trainer` or at the top level are errors that name the key and list the known ones.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

TOP_LEVEL_KEYS = ("model", "task", "trainer")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")

# YAML 1.1 reads "3e-4" (no dot) as a string; CLI users write floats that way, so accept it.
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A run config problem; the message names the key (dotted) and the fix."""


@dataclass
class TrainerConfig:
    """The optimisation budget and schedule (the `trainer:` section of a run config)."""

    steps: int = 1000                    # optimizer steps
    batch_size: int = 32                 # sequences (or images) per micro-batch, per process
    grad_accum: int = 1                  # micro-batches per optimizer step
    lr: float = 1e-3                     # peak learning rate
    min_lr_ratio: float = 0.1            # cosine ends at lr * min_lr_ratio
    warmup: int = 100                    # linear warmup steps from 0 to lr
    cosine: bool = True                  # cosine decay after warmup (False: constant lr)
    weight_decay: float = 0.1            # AdamW decay on matrices only (see zoo.train.param_groups)
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0               # max global grad norm; 0 disables clipping
    eval_every: int = 0                  # steps between evaluations (0: only at the end)
    eval_batches: int = 8                # batches per evaluation
    log_every: int = 10                  # steps between metric rows
    ckpt_every: int = 0                  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2            # newest complete checkpoints kept on disk
    seed: int = 0                        # model init, data order and dropout
    device: str = "auto"                 # auto | cpu | cuda
    precision: str = "auto"              # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False                # torch.compile the model
    parallel: str = "ddp"                # under torchrun: ddp | fsdp (FSDP2 fully_shard per block)
    progress: bool = True                # tqdm progress bar on rank 0
    init_from: str = ""                  # fine-tuning: start from these weights (zoo checkpoint, run
                                         # directory or Hugging Face directory); `model:` may then be left out

    def validate(self) -> "TrainerConfig":
        def positive(name, allow_zero=False):
            v = getattr(self, name)
            if v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"trainer.{name}={v} must be {'>= 0' if allow_zero else '> 0'}")

        for name in ("steps", "batch_size", "grad_accum", "lr", "eval_batches", "log_every",
                     "keep_checkpoints"):
            positive(name)
        for name in ("warmup", "weight_decay", "grad_clip", "eval_every", "ckpt_every", "eps"):
            positive(name, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"trainer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1] "
                              f"(the final lr as a fraction of trainer.lr)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"trainer.betas={self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        for name, allowed in (("device", DEVICES), ("precision", PRECISIONS), ("parallel", PARALLEL)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"trainer.{name}={getattr(self, name)!r} must be one of {', '.join(allowed)}")
        return self


@dataclass
class RunConfig:
    """A whole run: the model (dict, or path + overrides), the task dict and the trainer settings."""

    model: Any
    task: dict
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    source: str | None = None            # where it was read from, for messages

    def to_dict(self) -> dict:
        return {"model": copy.deepcopy(self.model), "task": copy.deepcopy(self.task),
                "trainer": dataclasses.asdict(self.trainer)}


def parse_value(text: str) -> Any:
    """A `--set` value: YAML, plus floats written without a dot (3e-4)."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text                    # not YAML (a pattern string such as *-*- reads as an alias)
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['trainer.lr=3e-4', 'model.d_model=64'] -> {'trainer.lr': 3e-4, 'model.d_model': 64}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: write KEY=VALUE with a dotted key, e.g. --set trainer.lr=3e-4")
        out[key] = parse_value(value)
    return out


def set_dotted(tree: dict, key: str, value: Any, *, where: str = "") -> None:
    """tree['a']['b'] = value for key 'a.b', creating intermediate dicts."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            path = ".".join(parts[: i + 1])
            raise ConfigError(f"{where}{key}: {path} is {child!r}, not a mapping, so it has no key "
                              f"{parts[i + 1]!r}; set {path} itself instead")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file (give a path to a YAML run config)")
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    return data


def _unknown_key(where: str, key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}{key}: unknown key{hint}; known keys: {', '.join(known)}")


def trainer_from_dict(data: dict | None, *, where: str = "") -> TrainerConfig:
    """TrainerConfig from a dict, with each value checked against the field's type."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(TrainerConfig)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(f"{where}trainer.", key, fields)
        default = getattr(TrainerConfig(), key)
        kwargs[key] = _coerce(value, default, f"{where}trainer.{key}")
    return TrainerConfig(**kwargs).validate()


def _coerce(value: Any, default: Any, name: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} must be true or false")
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)        # 1e4 -> 10000 for step counts
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} must be an integer")
    if isinstance(default, float):
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}={value!r} must be a number")
    if isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return [_coerce(v, float(d), f"{name}[{i}]") for i, (v, d) in enumerate(zip(value, default))] \
                if len(value) == len(default) else list(value)
        raise ConfigError(f"{name}={value!r} must be a list, e.g. {default}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}={value!r} must be a string")
    return value


def load_run_config(source: str | dict, overrides: list[str] | dict | None = None) -> RunConfig:
    """Read a run config (path or dict), apply dotted overrides, check every key.

    The model section stays as given (a dict, or a path string); `model.*` overrides are applied
    with the layout language's rules (zoo.layout.apply_overrides), loading a path into a dict first.
    """
    where = f"{source}: " if isinstance(source, str) else ""
    data = read_yaml(source) if isinstance(source, str) else copy.deepcopy(source)
    if not isinstance(data, dict):
        raise ConfigError("a run config must be a mapping with keys model, task, trainer")
    if isinstance(overrides, dict):
        ov = dict(overrides)
    else:
        ov = parse_overrides(overrides)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown_key(where, key, TOP_LEVEL_KEYS)
    base_dir = os.path.dirname(os.path.abspath(source)) if isinstance(source, str) else os.getcwd()

    model = data.get("model")
    trainer = dict(data.get("trainer") or {})
    init_from = ov.get("trainer.init_from", trainer.get("init_from"))
    if model is None and not init_from:
        raise ConfigError(f"{where}model: missing; give a model config dict or a path to configs/models/*.yaml "
                          f"(or trainer.init_from: a checkpoint directory to fine-tune, whose model is used)")
    if isinstance(model, str):
        model = resolve_model_path(model, base_dir)
    elif model is None:
        model = pretrained_model_config(init_from)
    task = data.get("task")
    if not isinstance(task, dict):
        raise ConfigError(f"{where}task: missing or not a mapping; give a task dict such as "
                          f"{{name: mqar, vocab_size: 256, seq_len: 128, num_kv_pairs: 16}}")

    model_overrides = {}
    for key, value in ov.items():
        head, _, rest = key.partition(".")
        if head not in TOP_LEVEL_KEYS or not rest:
            raise ConfigError(f"--set {key}: the key must start with model., task. or trainer. "
                              f"(e.g. --set trainer.lr=3e-4)")
        if head == "model":
            model_overrides[rest] = value
        elif head == "task":
            set_dotted(task, rest, value, where="--set task.")
        else:
            if "." in rest:
                raise _unknown_key("--set trainer.", rest, [f.name for f in dataclasses.fields(TrainerConfig)])
            trainer[rest] = value
    if model_overrides:
        # the layout language's own override rules (list indices, replacing the layout form)
        from zoo.layout import apply_overrides
        model = apply_overrides(load_model_yaml(model) if isinstance(model, str) else model, model_overrides,
                                source=model if isinstance(model, str) else None)
    return RunConfig(model=model, task=task, trainer=trainer_from_dict(trainer, where=where),
                     source=source if isinstance(source, str) else None)


def pretrained_model_config(path: str) -> dict:
    """The model config of a checkpoint directory (zoo format, run directory or Hugging Face), read
    without loading the weights, for a fine-tuning run that gives no `model:`."""
    from zoo import checkpoint as ckpt
    from zoo.hf import hf_to_zoo_config, is_hf_checkpoint, read_hf_config

    if not os.path.isdir(path):
        raise ConfigError(f"trainer.init_from={path!r} is not a directory; give a zoo checkpoint, a run "
                          f"directory or a Hugging Face checkpoint directory")
    resolved = path if ckpt.is_zoo_checkpoint(path) else (ckpt.latest_checkpoint(path) or path)
    if ckpt.is_zoo_checkpoint(resolved):
        return load_model_yaml(os.path.join(resolved, ckpt.CONFIG_FILE))
    if is_hf_checkpoint(path):
        return hf_to_zoo_config(read_hf_config(path))
    raise ConfigError(f"trainer.init_from={path!r} holds no checkpoint (expected {ckpt.CONFIG_FILE} + "
                      f"{ckpt.WEIGHTS_FILE}, a run directory, or config.json + safetensors)")


def resolve_model_path(path: str, base_dir: str) -> str:
    """A model path as written in a run config: relative to the working directory, then to the run
    config's folder, then to the repository's configs/models/."""
    candidates = [path, os.path.join(base_dir, path),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models", path)]
    for cand in candidates:
        if os.path.isfile(cand):
            return cand
        if os.path.isfile(cand + ".yaml"):
            return cand + ".yaml"
    from zoo.layout import resolve_config_path        # bare names: configs/models/{,tiny/}NAME.yaml
    found = resolve_config_path(path)
    if os.path.isfile(found):
        return found
    raise ConfigError(f"model: {path!r} is not a file (looked in the working directory, next to the run "
                      f"config and in configs/models/); give a path to a model YAML or an inline dict")


def load_model_yaml(path: str) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config must be a YAML mapping")
    return data
