"""Induction heads (Olsson et al., 2022; the Mamba paper's synthetic, section 4.1.2).

Tokens: vocab_size - 1 is the special token S; ordinary tokens are uniform in [0, vocab_size - 1).
A sequence of random ordinary tokens carries S once at a random position p, followed by the answer
token a; the last position is S again, and the model must output a there:

    inputs:  4 9 1 S a 7 ... 2 0 S
    targets: . . . . . . ... . . a     (. = -100)

Only the last position is scored. S appears exactly twice, so the answer is unambiguous. The Mamba
paper trains at seq_len 256 (vocab_size 16) and evaluates at lengths up to 2^20: set eval_seq_len
for such extrapolation (the validation set is drawn at that length; train batches at seq_len).
"""
from __future__ import annotations

import numpy as np
import torch

from zoo.tasks import IGNORE_INDEX, SyntheticTask, check_int, resolved_config


def generate_induction_heads(g: np.random.Generator, num_examples: int, vocab_size: int,
                             seq_len: int) -> dict:
    """{"inputs": [n, seq_len] int64, "targets": [n, seq_len] int64} from generator g."""
    n, special = num_examples, vocab_size - 1
    inputs = g.integers(0, special, size=(n, seq_len), dtype=np.int64)
    # p in [0, seq_len - 3]: the answer at p + 1 then sits before the final S at seq_len - 1.
    p = g.integers(0, seq_len - 2, size=(n, 1))
    np.put_along_axis(inputs, p, special, axis=1)
    inputs[:, -1] = special
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    targets[:, -1] = np.take_along_axis(inputs, p + 1, axis=1)[:, 0]
    return {"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}


class InductionHeads(SyntheticTask):
    """Induction heads.

    Args:
        vocab_size: all token ids, the special token (vocab_size - 1) included; >= 3.
        seq_len: tokens per training example (>= 4).
        eval_seq_len: tokens per validation example; None means seq_len. Larger values test length
            extrapolation; a model with learned positions must cover max(seq_len, eval_seq_len).
        num_eval: examples in the fixed validation set.
        seed: train batches and the validation set are independent streams of this seed.
    Batches: {"inputs": int64 [b, l], "targets": int64 [b, l]}; metric: accuracy at the last position.
    """

    name = "induction_heads"
    kind = "lm"
    metric_name = "accuracy"
    higher_is_better = True
    eval_only_keys = ("num_eval", "eval_seq_len")

    def __init__(self, vocab_size: int = 16, seq_len: int = 256, eval_seq_len: int | None = None,
                 num_eval: int = 1000, seed: int = 0):
        t = self.name
        vocab_size = check_int("vocab_size", t, vocab_size, 3)
        seq_len = check_int("seq_len", t, seq_len, 4)
        eval_seq_len = seq_len if eval_seq_len is None else check_int("eval_seq_len", t, eval_seq_len, 4)
        num_eval = check_int("num_eval", t, num_eval, 1)
        seed = check_int("seed", t, seed, 0)
        self.config = resolved_config(self.name, locals())
        self.vocab_size, self.seq_len, self.eval_seq_len = vocab_size, seq_len, eval_seq_len
        self.num_eval, self.seed = num_eval, seed
        self.special_token = vocab_size - 1

    def _generate(self, g: np.random.Generator, n: int, seq_len: int) -> dict:
        return generate_induction_heads(g, n, self.vocab_size, seq_len)

