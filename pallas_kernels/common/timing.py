"""Wall-clock timing of jitted calls: the one helper the autotuner, the benchmarks and the tests share."""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable, Sequence

import jax


def median_time(fn: Callable, iters: int = 10, *, args: tuple = (), arg_sets: Sequence[tuple] | None = None,
                warmup: int = 1, calls_per_sample: int = 1) -> float:
    """Median seconds of one call fn(*args), after `warmup` untimed calls (the first compiles).

    Each of the `iters` samples times `calls_per_sample` back-to-back calls and blocks on the last
    result only (`jax.block_until_ready`), so that more than one call per sample hides the host's
    dispatch behind the device's work; the sample is divided by that count. fn may close over its
    inputs (args=(), the default). arg_sets, instead of args: argument tuples taken in turn, call
    after call (e.g. copies of the inputs, so that no call finds another's data in L2).
    """
    if iters < 1 or calls_per_sample < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1, calls_per_sample >= 1, warmup >= 0, got {iters=}, "
                         f"{calls_per_sample=}, {warmup=}")
    if arg_sets is not None and args:
        raise ValueError("pass args or arg_sets, not both")
    calls = itertools.cycle([tuple(args)] if arg_sets is None else list(arg_sets))
    for _ in range(warmup):
        jax.block_until_ready(fn(*next(calls)))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(calls_per_sample):
            result = fn(*next(calls))
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / calls_per_sample)
    return statistics.median(samples)
