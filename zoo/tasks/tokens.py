"""Language modelling over pre-tokenised ids on disk (nanoGPT-style .bin, or .npy).

The file is memory-mapped, never read whole: a .npy through np.load(mmap_mode="r") (its own
dtype; any C-ordered shape is flattened to one stream), any other file as a raw np.memmap of
`dtype` (default uint16, the usual format for vocabularies under 65536). Windows of seq_len + 1
ids are sampled as in `bytes`. Validation: a separate file (val_path), else the last val_fraction
of the ids. Ids >= vocab_size in a batch raise ValueError (the file and vocab_size disagree).

Metric: loss = mean cross-entropy in nats per token; derived_metrics gives perplexity = exp(loss).
"""
from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import torch

from zoo.tasks import Task, check_fraction, check_int, resolved_config, token_cross_entropy
from zoo.tasks.windows import Windows


def open_ids(path: str, dtype: str, key: str = "path") -> np.ndarray:
    """A read-only 1-D view of the ids in `path` (memory-mapped)."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise ValueError(f"task 'tokens': {key}={path!r} is not a file; give a .npy or raw .bin of ids")
    if path.endswith(".npy"):
        arr = np.load(path, mmap_mode="r")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"task 'tokens': {key}={path!r} holds {arr.dtype}, not integer token ids")
        if arr.ndim != 1:
            if not arr.flags.c_contiguous:
                raise ValueError(f"task 'tokens': {key}={path!r} has shape {arr.shape} in Fortran order; "
                                 f"save it C-ordered or flattened")
            arr = arr.reshape(-1)
        return arr
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"task 'tokens': dtype={dtype!r} is not a numpy dtype (e.g. uint16, uint32)") from e
    if not np.issubdtype(np_dtype, np.integer):
        raise ValueError(f"task 'tokens': dtype={dtype!r} must be an integer dtype (uint16, uint32, int32, ...)")
    size = os.path.getsize(path)
    if size % np_dtype.itemsize:
        raise ValueError(f"task 'tokens': {key}={path!r} has {size} bytes, not a multiple of "
                         f"{np_dtype.itemsize} ({np_dtype}); is dtype right?")
    if size == 0:
        raise ValueError(f"task 'tokens': {key}={path!r} is empty")
    return np.memmap(path, dtype=np_dtype, mode="r")


class Tokens(Task):
    """Pre-tokenised LM.

    Args:
        path: the training ids (.npy, or raw binary of `dtype`).
        vocab_size: the tokenizer's vocabulary; every id must be smaller.
        seq_len: tokens per example.
        dtype: element type of a raw file (ignored for .npy).
        val_path: a separate validation file; None holds out the tail of `path`.
        val_fraction: the held-out tail share when val_path is None.
        num_eval: validation windows (fewer if the validation ids are short).
        seed: the stream of training window offsets.
    """

    name = "tokens"
    kind = "lm"
    metric_name = "loss"
    higher_is_better = False

    def __init__(self, path: str, vocab_size: int, seq_len: int = 512, dtype: str = "uint16",
                 val_path: str | None = None, val_fraction: float = 0.01, num_eval: int = 256,
                 seed: int = 0):
        t = self.name
        vocab_size = check_int("vocab_size", t, vocab_size, 1)
        seq_len = check_int("seq_len", t, seq_len, 1)
        num_eval = check_int("num_eval", t, num_eval, 1)
        seed = check_int("seed", t, seed, 0)
        val_fraction = check_fraction("val_fraction", t, val_fraction)
        path, dtype = os.fspath(path), str(dtype)
        val_path = os.fspath(val_path) if val_path is not None else None
        self.config = resolved_config(self.name, locals())
        self.vocab_size, self.seq_len, self.eval_seq_len = vocab_size, seq_len, seq_len
        ids = open_ids(path, dtype)
        if val_path is not None:
            train, val = ids, open_ids(val_path, dtype, key="val_path")
        else:
            cut = len(ids) - int(round(len(ids) * val_fraction))
            train, val = ids[:cut], ids[cut:]
        self.windows = Windows(train, val, seq_len, num_eval, seed, t)
        self._fingerprint = {"train_tokens": int(len(train)), "val_tokens": int(len(val)),
                             "dtype": str(ids.dtype)}

    def fingerprint(self) -> dict:
        return dict(self._fingerprint)

    def _checked(self, batch: dict, where: str) -> dict:
        top = int(torch.maximum(batch["inputs"].max(), batch["targets"].max()))
        low = int(torch.minimum(batch["inputs"].min(), batch["targets"].min()))
        if top >= self.vocab_size or low < 0:
            raise ValueError(f"task 'tokens': {where} holds token id {top if top >= self.vocab_size else low}, "
                             f"outside [0, vocab_size={self.vocab_size}); set vocab_size to the "
                             f"tokenizer's vocabulary (or check dtype={self.config['dtype']!r})")
        return batch

    def train_batch(self, step: int, batch_size: int) -> dict:
        return self._checked(self.windows.train_batch(step, batch_size), f"train batch {step}")

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        for batch in self.windows.eval_batches(batch_size):
            yield self._checked(batch, "the validation set")

    def metric(self, logits: torch.Tensor, batch: dict) -> tuple[float, float]:
        """(summed cross-entropy in nats, tokens scored); logits [b, seq_len, vocab_size]."""
        return token_cross_entropy(logits, batch["targets"])

    def derived_metrics(self, value: float) -> dict[str, float]:
        return {"perplexity": math.exp(min(value, 700.0))}
