"""Shared pytest setup: CPU by default, `gpu` tests skipped where no GPU is present.

`simulator` tests run the Hopper (Mosaic GPU) kernels in JAX's CPU simulator of the GPU. They are
opt-in (FA2JAX_SIMULATOR_TESTS=1, or `make test-simulator`): with jax 0.10.2 on a 2-core machine the
simulator was seen to deadlock intermittently over the whole set (its warpgroup threads block inside
XLA host callbacks), which would hang CI. Every one of them passed in isolation here, and the same
kernels are covered by the `gpu` tests on an H100. The exception is one small case per kernel, marked
`simulator_smoke` as well: those run in every `make test` (24 of 24 runs passed on 2 cores, 5-20 s
each), under a watchdog that ends the worker with its stack traces if one ever hangs, so that a
deadlock fails the run instead of stalling it.
"""
import faulthandler
import os

from cpu_flags import with_cpu_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist's workers and the tests' subprocesses inherit XLA_FLAGS. A flag already in XLA_FLAGS
# keeps its value; GPU runs (JAX_PLATFORMS=cuda) keep XLA's defaults.
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", ""))
    # The simulator's warpgroups block inside XLA host callbacks, each holding a thread of XLA's CPU
    # pool, which has one thread per core: on 2 cores three or four warpgroups starve it and hang
    # (benchmarks/simulator_vjp_hang.py). NPROC sizes that pool; 8 threads cost the suite no time on
    # 2 cores (693 s without, 671 s with, one run each). A value the user sets wins.
    os.environ.setdefault("NPROC", "8")

import jax  # noqa: E402  (the platform must be chosen before jax is imported)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

SIMULATOR_WATCHDOG_S = 600  # ten times the slowest smoke case on a loaded 2-core machine


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    _slow_modules_first(items)
    if os.environ.get("FA2JAX_SIMULATOR_TESTS") != "1":
        skip_simulator = pytest.mark.skip(reason="opt-in: FA2JAX_SIMULATOR_TESTS=1 (see conftest)")
        for item in items:
            if "simulator" in item.keywords and "simulator_smoke" not in item.keywords:
                item.add_marker(skip_simulator)
    if _has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _slow_modules_first(items):
    """Moves the modules that hold a `slow` or `simulator_smoke` test to the front, each kept whole
    (its fixtures are built once per worker), in their order.

    pytest-xdist hands the tests out in this order, and the run ends when the last worker does: with
    the long tests started first, the workers end on short ones. The order depends only on the marks,
    so every worker collects the same list, as xdist requires."""
    slow = {item.path for item in items if "slow" in item.keywords or "simulator_smoke" in item.keywords}
    items.sort(key=lambda item: item.path not in slow)  # stable: the order within each part stays


@pytest.fixture(autouse=True)
def _simulator_watchdog(request):
    """Ends the process (printing every thread's stack) if a simulator test outlives the watchdog."""
    if "simulator" not in request.keywords:
        yield
        return
    faulthandler.dump_traceback_later(SIMULATOR_WATCHDOG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
