"""One Hopper forward in Mosaic GPU's simulator with one warpgroup slowed down: a schedule the GPU may
run (warpgroups advance at any relative speed) that the simulator's threads rarely reach on their own.

tests/test_mosaic_forward.py runs this file in a subprocess, because a barrier protocol that breaks
under the schedule leaves the simulator's other threads waiting forever:

    python tests/slow_warpgroup_check.py '<json>'

<json>: {"shape": [B, T, S, H, K, D], "config": {MosaicFwdConfig fields}, "slow": warpgroup,
"delay_s": seconds}. Warpgroup `slow` sleeps delay_s before each of its barrier waits. When an
arrival completes a barrier's phase again before any thread has waited on the one before (on the GPU
the waiter's parity wait then skips a phase: a deadlock or a race), the simulator raises inside the
arriving thread; this file then prints "BARRIER <source line> <message>" and exits with status 3
at once. Otherwise it checks the result against the reference (tests/test_mosaic_forward.py's
`_check`) and prints "PASS".
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402,F401  (the tests' XLA flags and NPROC, before jax starts)
from jax._src import source_info_util  # noqa: E402
from jax._src.pallas.mosaic_gpu.interpret import shared_memory  # noqa: E402

from test_mosaic_forward import _check  # noqa: E402


def slow_down(warpgroup: int, delay_s: float):
    """Patches the simulator's barriers: warpgroup sleeps before each wait; a double completion exits."""
    wait, arrive = shared_memory.Barrier.wait, shared_memory.Barrier.arrive

    def slow_wait(self, device_id, local_thread_id, **kwargs):
        if local_thread_id == warpgroup:
            time.sleep(delay_s)
        return wait(self, device_id, local_thread_id, **kwargs)

    def arrive_or_exit(self, clock=None, logging_info=None):
        try:
            return arrive(self, clock, logging_info)
        except ValueError as e:
            where = source_info_util.summarize(logging_info.source_info) if logging_info else "?"
            print(f"BARRIER {where} (warpgroup {logging_info and logging_info.thread_id}): {e}", flush=True)
            os._exit(3)

    shared_memory.Barrier.wait, shared_memory.Barrier.arrive = slow_wait, arrive_or_exit


def main(spec: dict):
    slow_down(spec["slow"], spec["delay_s"])
    B, T, S, H, K, D = spec["shape"]
    _check(B, T, S, H, K, D, variant=spec["config"])
    print("PASS", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
