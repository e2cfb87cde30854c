"""Wall-clock timing of jitted calls: the one helper the autotuner, the benchmarks and the tests share."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def median_time(fn: Callable, iters: int = 10, *, args: tuple = (), warmup: int = 1,
                calls_per_sample: int = 1) -> float:
    """Median seconds of one call fn(*args), after `warmup` untimed calls (the first compiles).

    Each of the `iters` samples times `calls_per_sample` back-to-back calls and blocks on the last
    result only (`jax.block_until_ready`), so that more than one call per sample hides the host's
    dispatch behind the device's work; the sample is divided by that count. fn may ignore args and
    close over its inputs (args=(), the default).
    """
    if iters < 1 or calls_per_sample < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1, calls_per_sample >= 1, warmup >= 0, got {iters=}, "
                         f"{calls_per_sample=}, {warmup=}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(calls_per_sample):
            result = fn(*args)
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / calls_per_sample)
    return statistics.median(samples)
