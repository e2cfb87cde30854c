"""GPU sweep of the Hopper backward's tile configurations: the backward kernels alone, per shape.

    PYTHONPATH=. python benchmarks/mosaic_bwd_sweep.py --out $OUT [--deadline 300]

Times `mosaic_bwd.backward` (dK/dV + dQ, or dK/dV with the reduce-add dQ) on inputs already padded,
with lse and delta from our forward, for every candidate `MosaicBwdConfig`; prints TFLOP/s
(2.5 x the forward's FLOPs, FA2's count for the backward) and writes `bwd_sweep.json`. The best
config per shape feeds `MosaicBwdConfig` defaults / the tuning cache.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp

from pallas_kernels.fa2 import mosaic_bwd, mosaic_fwd
from pallas_kernels.testing import attention_inputs, median_time


def candidates(head_dim: int, deterministic: bool):
    """The dK/dV tiles and ring depth first (dQ tiles fixed), then the dQ kernel's tiles."""
    for (bq, bkv), stages in itertools.product(((64, 64), (128, 64), (64, 128)), (2, 3)):
        yield mosaic_bwd.MosaicBwdConfig(block_q=bq, block_kv=bkv, num_stages=stages,
                                         deterministic=deterministic)
    if deterministic:  # the reduce-add mode has no dQ kernel
        for bqdq, bkvdq in ((128, 64), (64, 128), (128, 128)):
            yield mosaic_bwd.MosaicBwdConfig(block_q_dq=bqdq, block_kv_dq=bkvdq)


def problem_for(S: int, D: int, causal: bool) -> mosaic_fwd.MosaicProblem:
    return mosaic_fwd.MosaicProblem(q_len=S, kv_len=S, q_offset=0, window_left=-1,
                                    window_right=0 if causal else -1, sm_scale=D ** -0.5, group_size=1)


def sweep_shape(B, S, H, D, causal, deadline_at, rows):
    q, k, v, do = attention_inputs(0, B, S, S, H, H, D, jnp.bfloat16)
    problem = problem_for(S, D, causal)
    out, lse2 = jax.jit(lambda q, k, v: mosaic_fwd.forward(
        q, k, v, problem=problem, config=mosaic_fwd.MosaicFwdConfig.for_head_dim(D)))(q, k, v)
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
    flops = 2.5 * 4.0 * B * S * S * H * D / (2 if causal else 1)
    case = f"{B}x{S}x{H}x{D}{' causal' if causal else ''}"
    best = {}
    for deterministic in (True, False):
        for config in candidates(D, deterministic):
            if time.perf_counter() > deadline_at:
                print("deadline", flush=True)
                return
            fn = jax.jit(lambda q, k, v, do, lse2, delta, config=config: mosaic_bwd.backward(
                q, k, v, do, lse2, delta, problem=problem, config=config))
            try:
                t = median_time(fn, 5, args=(q, k, v, do, lse2, delta), warmup=1, calls_per_sample=10)
                tflops = flops / t / 1e12
            except Exception as error:  # noqa: BLE001 -- a config that does not fit is a result
                tflops = None
                print(case, config, "ERROR", repr(error)[:200], flush=True)
            rows.append({"case": case, "config": str(config), "tflops": tflops})
            if tflops is not None:
                print(f"{case} {config}: {tflops:.0f} TFLOP/s", flush=True)
                if tflops > best.get(deterministic, (0, None))[0]:
                    best[deterministic] = (tflops, config)
    for deterministic, (tflops, config) in best.items():
        print(f"BEST {case} deterministic={deterministic}: {tflops:.0f} {config}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp", help="folder for bwd_sweep.json")
    parser.add_argument("--deadline", type=float, default=1e9, help="stop starting new configs after these seconds")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    deadline_at = time.perf_counter() + args.deadline
    rows = []
    for shape in [(2, 8192, 16, 128, True), (4, 4096, 32, 64, True), (2, 8192, 16, 128, False),
                  (4, 4096, 32, 64, False)]:
        sweep_shape(*shape, deadline_at, rows)
        with open(f"{args.out}/bwd_sweep.json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
