"""What the kernels ask of the device: where they run, and how large the GPU is.

Every "are we on a GPU, or interpreting?" decision in `pallas_kernels` goes through `on_gpu` /
`resolve_interpret`, and every "is this a Hopper?" through `on_hopper`, so the families cannot
disagree. Facts about the GPU (SM count, compute capability) are read from the device, never assumed:
an H100 SXM has 132 SMs, an H100 PCIe 114.
"""

from __future__ import annotations

import functools

import jax

GPU_BACKENDS = ("gpu", "cuda", "rocm")
# Where the device reports no SM count (CPU interpret mode, Mosaic GPU's simulator), heuristics that
# size a grid to the GPU plan for this many: an H100 SXM's, so that tests on CPU take the split
# counts of the GPU the kernels were tuned on.
FALLBACK_SM_COUNT = 132


def default_device() -> jax.Device:
    """The device kernels launched without placement run on."""
    return jax.devices()[0]


def on_gpu() -> bool:
    """Whether the default backend is a GPU, where the kernels are compiled rather than interpreted."""
    return jax.default_backend() in GPU_BACKENDS


def resolve_interpret(interpret: bool | None) -> bool:
    """`interpret` as given, or (None) interpret everywhere but on a GPU backend."""
    return (not on_gpu()) if interpret is None else bool(interpret)


def compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the default device, or None when it is not an NVIDIA GPU."""
    device = default_device()
    capability = str(getattr(device, "compute_capability", "") or "")
    if device.platform != "gpu" or not capability[:1].isdigit():
        return None
    major, _, minor = capability.partition(".")
    return int(major), int(minor or 0)


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x), where the Mosaic GPU
    kernels run."""
    capability = compute_capability()
    return capability is not None and capability[0] == 9


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    """Streaming multiprocessors of the default device (`FALLBACK_SM_COUNT` where it reports none)."""
    try:
        count = getattr(default_device(), "core_count", None)
    except RuntimeError:
        count = None
    return int(count) if count else FALLBACK_SM_COUNT


def device_kind() -> str:
    """The default device's kind, e.g. 'NVIDIA H100 80GB HBM3' (the tuning cache's key)."""
    return default_device().device_kind
