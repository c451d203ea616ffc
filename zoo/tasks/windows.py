"""Contiguous windows over a flat array of token ids: the sampler behind `bytes` and `tokens`."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from zoo.tasks import STREAM_TRAIN, check_int, rng


class Windows:
    """Windows of seq_len + 1 ids from 1-D arrays (numpy arrays or memmaps; read only).

    A window w gives inputs w[:-1] and targets w[1:], both [seq_len]. Train windows start at
    offsets drawn uniformly from rng(seed, STREAM_TRAIN, step, batch_size), so a batch is a pure
    function of its step. Validation windows are fixed: num_eval of them spread evenly over the
    validation array without overlapping, or, when it is too short for that, every non-overlapping
    window it holds (so the set can be smaller than num_eval).
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, seq_len: int, num_eval: int, seed: int,
                 task: str):
        for what, arr in (("training", train), ("validation", val)):
            if len(arr) < seq_len + 1:
                raise ValueError(f"task {task!r}: the {what} data holds {len(arr)} ids, fewer than "
                                 f"seq_len + 1 = {seq_len + 1}; lower seq_len or give more data"
                                 + (" (or a larger val_fraction)" if what == "validation" else ""))
        self.train, self.val, self.seq_len, self.seed, self.task = train, val, seq_len, seed, task
        window, n = seq_len + 1, len(val)
        if num_eval * window <= n:
            spacing = (n - window) // max(num_eval - 1, 1)    # >= window: no two windows overlap
            self.eval_starts = np.arange(num_eval, dtype=np.int64) * spacing
        else:
            self.eval_starts = np.arange(n // window, dtype=np.int64) * window
        self._offsets = np.arange(window, dtype=np.int64)

    def _gather(self, arr: np.ndarray, starts: np.ndarray) -> dict:
        w = torch.from_numpy(np.asarray(arr[starts[:, None] + self._offsets], dtype=np.int64))
        return {"inputs": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()}

    def train_batch(self, step: int, batch_size: int) -> dict:
        step = check_int("step", self.task, step, 0)
        batch_size = check_int("batch_size", self.task, batch_size)
        g = rng(self.seed, STREAM_TRAIN, step, batch_size)
        starts = g.integers(0, len(self.train) - self.seq_len, size=batch_size, dtype=np.int64)
        return self._gather(self.train, starts)

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        batch_size = check_int("batch_size", "eval_batches", batch_size)
        for i in range(0, len(self.eval_starts), batch_size):
            yield self._gather(self.val, self.eval_starts[i:i + batch_size])
