"""Tasks: the data (and the metric) a model is trained and evaluated on, all offline.

    task = build_task({"name": "mqar", "vocab_size": 256, "seq_len": 128, "num_kv_pairs": 16})
    batch = task.train_batch(step, batch_size)       # {"inputs": [b, l] int64, "targets": [b, l] int64}
    for batch in task.eval_batches(batch_size): ...  # a fixed validation set
    s, n = task.metric(logits, batch)                # summed over eval batches, reported as s / n

Every batch is a pure function of (seed, step, batch_size): a run resumed at step s sees exactly
the batches a straight run saw, with nothing but the step to remember. `state_dict` records the
task's resolved config and a fingerprint of its data, so resuming on different data is an error
instead of a silent change.

Tasks (one module each): mqar, selective_copying, induction_heads (synthetic recall), bytes
(byte-level LM over text files), tokens (pre-tokenised ids), images (classification).
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Iterator

import numpy as np
import torch

IGNORE_INDEX = -100

# Independent random streams of one seed: train batches, the validation set, data splits.
STREAM_TRAIN, STREAM_EVAL, STREAM_SPLIT = 0, 1, 2

_REGISTRY = {
    "mqar": "zoo.tasks.mqar:MQAR",
    "selective_copying": "zoo.tasks.selective_copying:SelectiveCopying",
    "induction_heads": "zoo.tasks.induction_heads:InductionHeads",
    "bytes": "zoo.tasks.bytes:Bytes",
    "tokens": "zoo.tasks.tokens:Tokens",
    "images": "zoo.tasks.images:Images",
}

TASK_NAMES = tuple(_REGISTRY)


def rng(seed: int, stream: int, *counters: int) -> np.random.Generator:
    """A numpy Generator that depends only on (seed, stream, *counters): batches are pure functions
    of their step, so resuming needs no generator state."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, *counters])))


class Task:
    """Base of every task. Subclasses set the attributes in their constructor.

    Attributes:
        name: registry name ("mqar", ...).
        kind: "lm" (token sequences) or "classify" (images).
        vocab_size: lm: the token ids the model must embed and predict; None for classify.
        num_classes, image_size, channels: classify; None for lm.
        seq_len: lm: tokens per training example; None for classify.
        eval_seq_len: lm: tokens per validation example (differs from seq_len only for length
            extrapolation, e.g. induction_heads); a model with learned positions needs
            max(seq_len, eval_seq_len).
        metric_name, higher_is_better: what `metric` measures.
        config: the resolved constructor arguments (name included): `build_task(task.config)`
            rebuilds the same task.
    """

    name: str = ""
    kind: str = "lm"
    vocab_size: int | None = None
    num_classes: int | None = None
    image_size: int | None = None
    channels: int | None = None
    seq_len: int | None = None
    eval_seq_len: int | None = None
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    config: dict
    # Config keys that change only the validation set: a resume may change them.
    eval_only_keys: tuple[str, ...] = ("num_eval",)

    def train_batch(self, step: int, batch_size: int) -> dict:
        raise NotImplementedError

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        raise NotImplementedError

    def metric(self, logits: torch.Tensor, batch: dict) -> tuple[float, float]:
        """(sum, count) over the batch; the reported value is sum / count over all eval batches."""
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, batch: dict) -> dict[str, tuple[float, float]]:
        """Every (sum, count) this task can report; the first is `metric_name`. Optional for callers."""
        return {self.metric_name: self.metric(logits, batch)}

    def derived_metrics(self, value: float) -> dict[str, float]:
        """Metrics that are functions of the aggregated metric value (e.g. perplexity = exp(loss))."""
        return {}

    def fingerprint(self) -> dict:
        """What identifies the data beyond the config (corpus sizes, file hashes); {} for synthetic."""
        return {}

    def state_dict(self) -> dict:
        # Batches depend only on (seed, step, batch_size), so the trainer's step is the whole data
        # position; this records what the batches were drawn from, to refuse a mismatched resume.
        return {"config": dict(self.config), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        drop = set(self.eval_only_keys)
        saved = {k: v for k, v in state.get("config", {}).items() if k not in drop}
        now = {k: v for k, v in self.config.items() if k not in drop}
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ValueError(f"task state was saved for a different task config (keys {diff}: "
                             f"saved {[saved.get(k) for k in diff]}, now {[now.get(k) for k in diff]}); "
                             f"resume with the task config of the checkpoint")
        if state.get("fingerprint", {}) != self.fingerprint():
            raise ValueError(f"task {self.name!r}: the data changed since the checkpoint was saved "
                             f"(saved {state.get('fingerprint')}, now {self.fingerprint()}); resume on "
                             f"the same files or start a new run")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "name")
        return f"{type(self).__name__}({args})"


def _task_class(name: str) -> type:
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def task_arguments(name: str) -> dict[str, Any]:
    """The arguments a task accepts, with their defaults (inspect.Parameter.empty when required)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task name {name!r}; choose one of {', '.join(TASK_NAMES)}")
    sig = inspect.signature(_task_class(name).__init__)
    return {p.name: p.default for p in list(sig.parameters.values())[1:]}


def build_task(cfg: dict) -> Task:
    """Build a task from a config dict: {"name": <task>, **arguments}. Unknown names or keys and
    missing required arguments raise ValueError listing the valid choices."""
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ValueError(f"task config must be a dict with a 'name' key (one of {', '.join(TASK_NAMES)}), "
                         f"got {cfg!r}")
    cfg = dict(cfg)
    name = cfg.pop("name")
    args = task_arguments(name)
    unknown = sorted(set(cfg) - set(args))
    if unknown:
        raise ValueError(f"task {name!r}: unknown key(s) {unknown}; valid keys are {sorted(args)}")
    missing = [k for k, d in args.items() if d is inspect.Parameter.empty and k not in cfg]
    if missing:
        raise ValueError(f"task {name!r}: missing required key(s) {missing}")
    return _task_class(name)(**cfg)


# ---------------------------------------------------------------------------------------------
# Shared pieces of the task modules.

def resolved_config(name: str, local_vars: dict) -> dict:
    """The config dict of a task constructor call: name + every argument as resolved."""
    args = task_arguments(name)
    return {"name": name, **{k: local_vars[k] for k in args}}


def check_int(name: str, task: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"task {task!r}: {name}={value!r} must be an integer >= {minimum}")
    return int(value)


def check_fraction(name: str, task: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (0.0 <= value < 1.0) if allow_zero else (0.0 < value < 1.0)):
        raise ValueError(f"task {task!r}: {name}={value!r} must be a number in "
                         f"{'[0, 1)' if allow_zero else '(0, 1)'}")
    return float(value)


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(correct argmax predictions, scored positions) over targets != IGNORE_INDEX.

    logits: [b, l, vocab]; targets: [b, l].
    """
    targets = targets.to(logits.device)
    scored = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & scored
    return float(correct.sum()), float(scored.sum())


def sequence_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(sequences with every scored position right, sequences with any scored position)."""
    targets = targets.to(logits.device)
    scored = targets != IGNORE_INDEX
    wrong = ((logits.argmax(-1) != targets) & scored).any(-1)
    has = scored.any(-1)
    return float((has & ~wrong).sum()), float(has.sum())


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(summed cross-entropy in nats, scored positions), computed in fp32 whatever the logits dtype.

    logits: [b, l, vocab]; targets: [b, l].
    """
    targets = targets.to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                             reduction="sum")
    return float(loss), float((targets != IGNORE_INDEX).sum())


def batched(tensors: dict[str, torch.Tensor], batch_size: int) -> Iterator[dict]:
    """Consecutive slices of equal-length tensors: the fixed validation set in batches (last one
    may be smaller)."""
    n = len(next(iter(tensors.values())))
    batch_size = check_int("batch_size", "eval_batches", batch_size)
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in tensors.items()}


def synthetic_eval(generate, seed: int, num_eval: int, seq_len: int, batch_size: int) -> Iterator[dict]:
    """The fixed validation set of a synthetic task, in batches, without holding all of it.

    generate(g, n) -> batch dict of n examples. The set is drawn in chunks (chunk c from
    rng(seed, STREAM_EVAL, c), about 2^20 tokens each), so it depends only on the task config,
    not on batch_size, and a long-sequence extrapolation set never sits in memory whole.
    """
    batch_size = check_int("batch_size", "eval_batches", batch_size)
    chunk = max(1, min(256, 2 ** 20 // seq_len))
    pending: dict | None = None
    for c, start in enumerate(range(0, num_eval, chunk)):
        data = generate(rng(seed, STREAM_EVAL, c), min(chunk, num_eval - start))
        pending = data if pending is None else {k: torch.cat([pending[k], data[k]]) for k in data}
        while len(pending["targets"]) >= batch_size:
            yield {k: v[:batch_size] for k, v in pending.items()}
            pending = {k: v[batch_size:] for k, v in pending.items()}
    if pending is not None and len(pending["targets"]):
        yield pending


class SyntheticTask(Task):
    """A task whose examples a generator draws on the fly (mqar, selective_copying, induction_heads).

    Subclasses set seed, num_eval, seq_len, eval_seq_len and define
    `_generate(g, n, seq_len) -> {"inputs": [n, seq_len], "targets": [n, seq_len]}`; train batches
    come from rng(seed, STREAM_TRAIN, step, batch_size), the validation set from synthetic_eval.
    """

    seed: int = 0
    num_eval: int = 1000

    def _generate(self, g: np.random.Generator, n: int, seq_len: int) -> dict:
        raise NotImplementedError

    def train_batch(self, step: int, batch_size: int) -> dict:
        step = check_int("step", self.name, step, 0)
        batch_size = check_int("batch_size", self.name, batch_size)
        return self._generate(rng(self.seed, STREAM_TRAIN, step, batch_size), batch_size, self.seq_len)

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        def generate(g, n):
            return self._generate(g, n, self.eval_seq_len)
        return synthetic_eval(generate, self.seed, self.num_eval, self.eval_seq_len, batch_size)

    def metric(self, logits: torch.Tensor, batch: dict) -> tuple[float, float]:
        """Fraction of scored positions predicted exactly (argmax); logits [b, l, vocab]."""
        return token_accuracy(logits, batch["targets"])


LN2 = math.log(2.0)

__all__ = ["Task", "build_task", "task_arguments", "TASK_NAMES", "IGNORE_INDEX"]
