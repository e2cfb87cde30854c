"""Repro of a hang in Mosaic GPU's CPU simulator: a simulator artifact (XLA CPU thread-pool
starvation), not a barrier bug in our kernels. Kept as the evidence, and as a reminder for anyone who
reads a simulator hang as a kernel hang.

    FA2JAX_SIMULATOR_TESTS=1 JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/simulator_vjp_hang.py MODE

At B=1, T=77, S=129, 2 query heads over 1 KV head, D=64, bf16, seen on jax 0.10.2 (2-core CPU):
  fwd_lse      the Mosaic forward with return_lse=True under jit: finishes (~7 s)
  two          two Mosaic forwards in one jit: finishes (~15 s)
  vjp          the Mosaic forward under jax.vjp, portable backward: stopped after 100 s
Prints all threads' stacks when it stops.

Root cause. The simulator runs a kernel as an XLA host callback (thread_map) that starts one Python
thread per warpgroup; each thread runs its own jitted computation, whose barrier waits are host
callbacks that block. XLA's CPU client runs (parts of) those computations on its intra-op thread
pool, which has one thread per schedulable CPU (2 here), and a callback blocked in a barrier keeps
its pool thread. In the vjp program XLA runs the thread_map callback itself on a pool thread (its
stack has no Python parent; with the forward alone it runs on the main thread; presumably because
the outer program has work independent of the kernel, e.g. the backward's padding): one thread
is left for three warpgroups, one of them takes it and waits in a barrier for a warpgroup whose
computation is queued behind it. The stacks show exactly that: two threads with no Python
parent frames (XLA's pool: the thread_map callback, a barrier wait), one warpgroup waiting in a
barrier inline, two warpgroups inside XLA's execute with no callback running.
Evidence (same 2 cores; the shim is a 10-line LD_PRELOAD library, not committed, whose
sched_getaffinity reports N CPUs, which sizes XLA's pool):
  - the forward alone via mosaic_fwd.forward at the vjp path's exact arguments (Tp=128, Sp=256; the
    forward-alone path pads T to 256 because the Mosaic backward's tiles join the padding):
    finishes in ~7 s; under `taskset -c 0` (a 1-thread pool) it hangs with the same stacks, and
    with the shim at N=1 (both cores still usable) it hangs too;
  - `vjp` with the shim at N=8: finishes in 4.6 s; at N=3: 5.2 s; at N=2 (the real count): hangs.
  - the simulator checks barrier phases (a thread waiting for a phase already passed raises), so a
    protocol error shows as an exception, not as this hang; and
    tests/test_mosaic_forward.py::test_mosaic_step_counts_match_over_a_grid checks over a grid of
    T, S, windows and paddings that every CTA's consumers take the producer's step count.
A GPU runs warpgroups in hardware with no host thread pool, so this hang cannot happen there; it
explains nothing about the GPU train-step stall in BENCHMARKS.md (session 16). It does explain the
intermittent simulator deadlocks conftest.py describes on 2 cores.
"""
from __future__ import annotations

import faulthandler
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention
from pallas_kernels.testing import attention_inputs


def main() -> None:
    modes = ("fwd_lse", "two", "vjp")
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        raise SystemExit(f"usage: simulator_vjp_hang.py {{{','.join(modes)}}}")
    mode = sys.argv[1]
    faulthandler.dump_traceback_later(100, exit=True)
    q, k, v, do = attention_inputs(0, 1, 77, 129, 2, 1, 64, jnp.bfloat16)
    mosaic = dict(backend="mosaic", interpret=True)
    start = time.time()
    if mode == "fwd_lse":
        out = jax.jit(lambda q, k, v: flash_attention(q, k, v, return_lse=True, **mosaic))(q, k, v)
    elif mode == "two":
        out = jax.jit(lambda q, k, v: flash_attention(q, k, v, **mosaic) + flash_attention(2 * q, k, v, **mosaic))(q, k, v)
    else:
        attention = lambda q, k, v: flash_attention(q, k, v, backend=("mosaic", "portable"), interpret=True)
        out = jax.jit(lambda q, k, v, do: jax.vjp(attention, q, k, v)[1](do))(q, k, v, do)
    jax.block_until_ready(out)
    print(mode, "finished in", round(time.time() - start, 1), "s", flush=True)


if __name__ == "__main__":
    main()
