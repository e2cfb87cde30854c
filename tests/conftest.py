"""Shared pytest setup: CPU by default, `gpu` tests skipped where no GPU is present.

`simulator` tests run the Hopper (Mosaic GPU) kernels in JAX's CPU simulator of the GPU. They are
opt-in (FA2JAX_SIMULATOR_TESTS=1, or `make test-simulator`): with jax 0.10.2 on a 2-core machine the
simulator intermittently deadlocks (its warpgroup threads block inside XLA host callbacks), which
would hang CI. Every one of them passed in isolation here, and the same kernels are covered by
the `gpu` tests on an H100.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (the platform must be chosen before jax is imported)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FA2JAX_SIMULATOR_TESTS") != "1":
        skip_simulator = pytest.mark.skip(reason="opt-in: FA2JAX_SIMULATOR_TESTS=1 (see conftest)")
        for item in items:
            if "simulator" in item.keywords:
                item.add_marker(skip_simulator)
    if _has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
