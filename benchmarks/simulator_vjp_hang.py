"""Repro of a hang in Mosaic GPU's CPU simulator, kept for whoever digs into it (a lead for the GPU
train-step stall in BENCHMARKS.md, session 16, which also runs the Mosaic forward under jax.vjp).

    FA2JAX_SIMULATOR_TESTS=1 JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/simulator_vjp_hang.py MODE

At B=1, T=77, S=129, 2 query heads over 1 KV head, D=64, bf16, seen on jax 0.10.2 (2-core CPU):
  fwd_lse      the Mosaic forward with return_lse=True under jit: finishes (~7 s)
  two          two Mosaic forwards in one jit: finishes (~15 s)
  vjp          the Mosaic forward under jax.vjp, portable backward: every simulated warpgroup
               thread waits in a barrier; stopped after 100 s (causal or not, softcap or not)
The Mosaic backward alone (portable forward) passes the same shape in the simulator tests, and the
128x128 cases under vjp pass. Prints all threads' stacks when it stops.
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
