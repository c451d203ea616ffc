"""Timing shared by the benchmark scripts (run them from a checkout: `python benchmarks/<name>.py`)."""
from __future__ import annotations

import statistics

import torch


def cuda_median_ms(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over `reps` calls, each between two CUDA events and followed by a
    synchronisation, after `warmup` untimed calls (for ops too slow for do_bench's repetitions)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
