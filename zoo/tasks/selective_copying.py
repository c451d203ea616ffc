"""Selective copying (Gu & Dao, "Mamba", 2023, section 3.1 and appendix E.1).

Tokens: 0 is noise, vocab_size - 1 is the marker, data tokens are uniform in [1, vocab_size - 1).
A sequence of seq_len tokens is a body of seq_len - num_tokens positions, holding num_tokens data
tokens at random distinct positions (noise everywhere else), followed by num_tokens markers:

    inputs:  0 0 7 0 0 0 3 0 5 0 0 0 | M M M
    targets: . . . . . . . . . . . . | 7 3 5      (. = -100)

At the i-th marker the model must output the i-th data token of the body, in order. The data
positions are random, so a model cannot copy by a fixed time offset (the plain copying task): it
has to select the data tokens by content. The Mamba paper's setting: vocab_size 16, seq_len 4096,
16 tokens to copy.
"""
from __future__ import annotations

import numpy as np
import torch

from zoo.tasks import IGNORE_INDEX, SyntheticTask, check_int, resolved_config, sequence_accuracy
from zoo.tasks.mqar import distinct_choices

NOISE = 0


def generate_selective_copying(g: np.random.Generator, num_examples: int, vocab_size: int,
                               seq_len: int, num_tokens: int) -> dict:
    """{"inputs": [n, seq_len] int64, "targets": [n, seq_len] int64} from generator g."""
    n, marker, body = num_examples, vocab_size - 1, seq_len - num_tokens
    data = g.integers(1, marker, size=(n, num_tokens), dtype=np.int64)
    positions = np.sort(distinct_choices(g, n, body, num_tokens), axis=1)   # [n, num_tokens]
    inputs = np.full((n, seq_len), NOISE, dtype=np.int64)
    np.put_along_axis(inputs, positions, data, axis=1)
    inputs[:, body:] = marker
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    targets[:, body:] = data
    return {"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}


class SelectiveCopying(SyntheticTask):
    """Selective copying.

    Args:
        vocab_size: all token ids, noise (0) and marker (vocab_size - 1) included; >= 3.
        seq_len: tokens per example, markers included; >= 2 * num_tokens.
        num_tokens: data tokens to copy (Mamba paper: 16).
        num_eval: examples in the fixed validation set.
        seed: train batches and the validation set are independent streams of this seed.
    Batches: {"inputs": int64 [b, seq_len], "targets": int64 [b, seq_len]}.
    Metrics: accuracy per copied token; sequence_accuracy (all tokens right) from `metrics`.
    """

    name = "selective_copying"
    kind = "lm"
    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, vocab_size: int = 16, seq_len: int = 256, num_tokens: int = 16,
                 num_eval: int = 1000, seed: int = 0):
        t = self.name
        vocab_size = check_int("vocab_size", t, vocab_size, 3)
        seq_len = check_int("seq_len", t, seq_len, 2)
        num_tokens = check_int("num_tokens", t, num_tokens, 1)
        num_eval = check_int("num_eval", t, num_eval, 1)
        seed = check_int("seed", t, seed, 0)
        if seq_len < 2 * num_tokens:
            raise ValueError(f"task 'selective_copying': seq_len={seq_len} must be >= 2 * num_tokens = "
                             f"{2 * num_tokens} (the body holds num_tokens data tokens, then num_tokens "
                             f"markers follow); raise seq_len or lower num_tokens")
        self.config = resolved_config(self.name, locals())
        self.vocab_size, self.seq_len, self.eval_seq_len = vocab_size, seq_len, seq_len
        self.num_tokens, self.num_eval, self.seed = num_tokens, num_eval, seed
        self.noise_token, self.marker_token = NOISE, vocab_size - 1

    def _generate(self, g: np.random.Generator, n: int, seq_len: int) -> dict:
        return generate_selective_copying(g, n, self.vocab_size, seq_len, self.num_tokens)

    def metrics(self, logits: torch.Tensor, batch: dict) -> dict[str, tuple[float, float]]:
        return {"accuracy": self.metric(logits, batch),
                "sequence_accuracy": sequence_accuracy(logits, batch["targets"])}
