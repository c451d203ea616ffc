"""MQAR: multi-query associative recall (Arora, Eyuboglu et al., "Zoology", 2023).

A sequence of seq_len tokens starts with a context of num_kv_pairs key-value pairs

    k_1 v_1 k_2 v_2 ... k_K v_K | x x q x x x q x ...

keys distinct in [1, V/2), values distinct in [V/2, V). The rest of the sequence is
(seq_len - 2K) // 2 two-token slots; each key is queried once, at the first token of a slot drawn
without replacement with probability proportional to i^(power_a - 1) (slot i = 1, 2, ...), so
small power_a puts most queries soon after the context, as the gaps between repeated bigrams in
text follow a power law. Key i of the context goes to the i-th slot drawn, as in Zoology's
generator. The target at a query position is the value paired with that key (the model predicts
it while reading the query token); every other target is -100.

Positions that are neither context nor query hold uniform random tokens from [0, V) when
random_non_queries (Zoology's default; they may repeat a key or a value, which a model has to
ignore: only query positions are scored), else 0 (a token no key or value uses).
"""
from __future__ import annotations

import numpy as np
import torch

from zoo.tasks import IGNORE_INDEX, SyntheticTask, check_int, resolved_config, sequence_accuracy


def distinct_choices(g: np.random.Generator, rows: int, population: int, k: int) -> np.ndarray:
    """[rows, k] int64: per row, k distinct draws from range(population) in uniformly random order.

    Ranks of uniform noise: the k smallest of `population` i.i.d. uniforms sit at a uniformly random
    k-subset, and ordering them by their noise gives a uniformly random order.
    """
    noise = g.random((rows, population))
    idx = np.argpartition(noise, k - 1, axis=1)[:, :k] if k < population else \
        np.tile(np.arange(population), (rows, 1))
    order = np.argsort(np.take_along_axis(noise, idx, axis=1), axis=1)
    return np.take_along_axis(idx, order, axis=1).astype(np.int64)


def power_law_slots(g: np.random.Generator, rows: int, space: int, k: int, power_a: float) -> np.ndarray:
    """[rows, k] int64: slots in [0, space) drawn one after another without replacement, each with
    probability proportional to (slot + 1) ** (power_a - 1) among those left.

    Gumbel top-k: adding Gumbel noise to the log-weights and taking the k largest, in decreasing
    order, has the distribution of that sequential draw.
    """
    logw = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    gumbel = -np.log(-np.log(g.random((rows, space)).clip(1e-300, None)))
    return np.argsort(-(logw + gumbel), axis=1)[:, :k].astype(np.int64)


def generate_mqar(g: np.random.Generator, num_examples: int, vocab_size: int, seq_len: int,
                  num_kv_pairs: int, power_a: float, random_non_queries: bool) -> dict:
    """One MQAR batch from generator g: {"inputs": [n, seq_len] int64, "targets": [n, seq_len] int64}."""
    n, K = num_examples, num_kv_pairs
    half = vocab_size // 2
    keys = distinct_choices(g, n, half - 1, K) + 1                # [n, K] in [1, V/2)
    values = distinct_choices(g, n, vocab_size - half, K) + half  # [n, K] in [V/2, V)
    context = 2 * K
    slots = power_law_slots(g, n, (seq_len - context) // 2, K, power_a)
    query_pos = context + 2 * slots                               # [n, K]

    if random_non_queries:
        inputs = g.integers(0, vocab_size, size=(n, seq_len), dtype=np.int64)
    else:
        inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(targets, query_pos, values, axis=1)
    return {"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}


class MQAR(SyntheticTask):
    """Multi-query associative recall.

    Args:
        vocab_size: V, the model's vocabulary; keys come from [1, V/2), values from [V/2, V).
        seq_len: T, tokens per example; needs T >= 4 * num_kv_pairs (context + one slot per query).
        num_kv_pairs: K, key-value pairs in the context, each queried once.
        power_a: exponent of the query-slot power law (Zoology: 0.01; 1.0 is uniform).
        random_non_queries: fill the non-query positions with random tokens (True) or 0 (False).
        num_eval: examples in the fixed validation set.
        seed: train batches and the validation set are independent streams of this seed.
    Batches: {"inputs": int64 [b, T], "targets": int64 [b, T]}; metric: accuracy over queries.
    """

    name = "mqar"
    kind = "lm"
    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, vocab_size: int = 256, seq_len: int = 128, num_kv_pairs: int = 16,
                 power_a: float = 0.01, random_non_queries: bool = True, num_eval: int = 1000,
                 seed: int = 0):
        t = self.name
        vocab_size = check_int("vocab_size", t, vocab_size, 4)
        seq_len = check_int("seq_len", t, seq_len, 4)
        num_kv_pairs = check_int("num_kv_pairs", t, num_kv_pairs, 1)
        num_eval = check_int("num_eval", t, num_eval, 1)
        seed = check_int("seed", t, seed, 0)
        if num_kv_pairs > vocab_size // 2 - 1:
            raise ValueError(f"task 'mqar': num_kv_pairs={num_kv_pairs} distinct keys do not fit in "
                             f"[1, vocab_size/2) = [1, {vocab_size // 2}); raise vocab_size to at least "
                             f"{2 * num_kv_pairs + 2} or lower num_kv_pairs")
        if seq_len < 4 * num_kv_pairs:
            raise ValueError(f"task 'mqar': seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs}: "
                             f"the context takes 2K={2 * num_kv_pairs} tokens and each of the K queries a "
                             f"2-token slot; use seq_len >= {4 * num_kv_pairs} or fewer pairs")
        if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not power_a > 0:
            raise ValueError(f"task 'mqar': power_a={power_a!r} must be a number > 0 (0.01 as in Zoology, "
                             f"1.0 for uniform query slots)")
        if not isinstance(random_non_queries, bool):
            raise ValueError(f"task 'mqar': random_non_queries={random_non_queries!r} must be true or false")
        power_a = float(power_a)
        self.config = resolved_config(self.name, locals())
        self.vocab_size, self.seq_len, self.eval_seq_len = vocab_size, seq_len, seq_len
        self.num_kv_pairs, self.power_a = num_kv_pairs, power_a
        self.random_non_queries, self.num_eval, self.seed = random_non_queries, num_eval, seed

    def _generate(self, g: np.random.Generator, n: int, seq_len: int) -> dict:
        return generate_mqar(g, n, self.vocab_size, seq_len, self.num_kv_pairs, self.power_a,
                             self.random_non_queries)

    def metrics(self, logits: torch.Tensor, batch: dict) -> dict[str, tuple[float, float]]:
        return {"accuracy": self.metric(logits, batch),
                "sequence_accuracy": sequence_accuracy(logits, batch["targets"])}
