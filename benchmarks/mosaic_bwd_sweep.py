"""GPU sweep of the Hopper backward's tile configurations: the backward kernels alone, per shape.

    PYTHONPATH=. python benchmarks/mosaic_bwd_sweep.py --out $OUT [--deadline 300]
    PYTHONPATH=. python benchmarks/mosaic_bwd_sweep.py --atomic-variants --deadline 150 --out $OUT  # < ~200 s on an H100 (untimed yet)

Times `mosaic_bwd.backward` (dK/dV + dQ, or dK/dV with the reduce-add dQ) on inputs already padded,
with lse and delta from our forward, for every candidate `MosaicBwdConfig`; prints TFLOP/s
(2.5 x the forward's FLOPs, FA2's count for the backward) and writes `bwd_sweep.json`. The best
config per shape feeds `MosaicBwdConfig` defaults / the tuning cache.

--atomic-variants compares the reduce-add mode's dQ paths instead (`MosaicBwdConfig.dq_buffers`,
`dq_chunks`, `dq_with_dkdv`, `dq_split`; `atomic_variants` lists those that fit shared memory): first each
variant's dQ/dK/dV once against the f32 reference (|ours - f32| <= 2 |XLA in bf16 - f32| + 16 ulp * max|f32|, on a small causal GQA
case), then the backward alone at 2x8192x16x128 and 4x4096x32x64, causal and not, next to the
deterministic mode (its default tiles) and cuDNN (its fwd+bwd minus its forward). Writes
`atomic_variants.json`.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import time

import jax
import jax.numpy as jnp

from pallas_kernels import attention_reference
from pallas_kernels.common.numerics import backward_lse
from pallas_kernels.fa2 import mosaic_bwd, mosaic_fwd
from pallas_kernels.testing import attention_inputs, median_time, within_xla_error


def candidates(head_dim: int, deterministic: bool):
    """The dK/dV tiles and ring depth first (dQ tiles fixed), then the dQ kernel's tiles."""
    for (bq, bkv), stages in itertools.product(((64, 64), (128, 64), (64, 128)), (2, 3)):
        yield mosaic_bwd.MosaicBwdConfig(block_q=bq, block_kv=bkv, num_stages=stages,
                                         deterministic=deterministic)
    if deterministic:  # the reduce-add mode has no dQ kernel
        for bqdq, bkvdq in ((128, 64), (64, 128), (128, 128)):
            yield mosaic_bwd.MosaicBwdConfig(block_q_dq=bqdq, block_kv_dq=bkvdq)


def problem_for(S: int, D: int, causal: bool, group_size: int = 1) -> mosaic_fwd.MosaicProblem:
    return mosaic_fwd.MosaicProblem(q_len=S, kv_len=S, q_offset=0, window_left=-1,
                                    window_right=0 if causal else -1, sm_scale=D ** -0.5, group_size=group_size)


def backward_inputs(q, k, v, do, problem, D):
    """(lse2, delta) [B, H, T] f32 from our forward, as `api.py` hands them to the backward: the
    forward's lse is in natural log, the backward takes log2 units."""
    out, lse = jax.jit(lambda q, k, v: mosaic_fwd.forward(
        q, k, v, problem=problem, config=mosaic_fwd.MosaicFwdConfig.for_head_dim(D)))(q, k, v)
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
    return backward_lse(lse), delta


def atomic_variants(D: int):
    """The reduce-add mode's dQ-path variants whose dK/dV kernel fits shared memory at head dim D
    (num_stages=2, as `api.plan` sets for this mode)."""
    if D % 128 == 0:  # the two consumers share each step's partial, half the columns each (first:
        # the likeliest to pay, so a tight deadline still times them)
        for buffers in (1, 2):
            config = mosaic_bwd.MosaicBwdConfig(deterministic=False, dq_buffers=buffers, dq_split=True)
            if mosaic_bwd.dkdv_smem_bytes(config, head_dim=D, itemsize=2, segments=False) <= mosaic_bwd.SMEM_LIMIT_BYTES:
                yield config
    # (dq_buffers, dq_chunks): one whole buffer, two (D=64 only), two half-width ones. One buffer in
    # two chunks is left out: each chunk would wait for the one before it to drain.
    for (buffers, chunks), with_dkdv in itertools.product(((1, 1), (2, 1), (2, 2)), (False, True)):
        config = mosaic_bwd.MosaicBwdConfig(deterministic=False, dq_buffers=buffers, dq_chunks=chunks,
                                            dq_with_dkdv=with_dkdv)
        if mosaic_bwd.dkdv_smem_bytes(config, head_dim=D, itemsize=2, segments=False) <= mosaic_bwd.SMEM_LIMIT_BYTES:
            yield config


def variant_name(config: mosaic_bwd.MosaicBwdConfig) -> str:
    if config.deterministic:
        return "deterministic"
    return (f"atomic buf={config.dq_buffers}{f' chunks={config.dq_chunks}' if config.dq_chunks > 1 else ''}"
            f"{' with-dkdv' if config.dq_with_dkdv else ''}{' split' if config.dq_split else ''}")


@functools.lru_cache(maxsize=None)
def check_case(D: int, B=1, S=1024, H=4, K=2):
    """(inputs, problem, f32 reference grads, bf16 XLA grads) of the correctness case, once per D."""
    q, k, v, do = attention_inputs(1, B, S, S, H, K, D, jnp.bfloat16)
    problem = problem_for(S, D, True, group_size=H // K)
    lse2, delta = backward_inputs(q, k, v, do, problem, D)

    def grads(fn, *args):
        return jax.vjp(fn, *args[:3])[1](args[3])

    exact = jax.jit(lambda *a: grads(functools.partial(attention_reference, causal=True), *a))(
        *(x.astype(jnp.float32) for x in (q, k, v, do)))
    same = jax.jit(lambda *a: grads(functools.partial(attention_reference, causal=True, compute_dtype=jnp.bfloat16,
                                                      precision=jax.lax.Precision.DEFAULT), *a))(q, k, v, do)
    return (q, k, v, do, lse2, delta), problem, exact, same, f"{B}x{S}x{H}/{K}x{D} causal"


def check_variant(config, D) -> dict:
    """dQ, dK, dV of `mosaic_bwd.backward` under `config` against the f32 reference (causal, GQA)."""
    args, problem, exact, same, case = check_case(D)
    ours = jax.jit(lambda *a: mosaic_bwd.backward(*a, problem=problem, config=config))(*args)
    row = {"case": case, "variant": variant_name(config), "ok": True}
    for what, a, e, s in zip(("dq", "dk", "dv"), ours, exact, same):
        row[what] = within_xla_error(a, e, s, jnp.bfloat16)
        row["ok"] &= row[what]["ok"]
    return row


def time_variants(B, S, H, D, causal) -> dict:
    """Backward seconds (compile excluded) of the deterministic mode, each reduce-add variant and cuDNN."""
    q, k, v, do = attention_inputs(0, B, S, S, H, H, D, jnp.bfloat16)
    problem = problem_for(S, D, causal)
    lse2, delta = backward_inputs(q, k, v, do, problem, D)
    row = {"case": f"{B}x{S}x{H}x{D}{' causal' if causal else ''}",
           "bwd_flops": 2.5 * 4.0 * B * S * S * H * D / (2 if causal else 1), "ms": {}}
    configs = [mosaic_bwd.MosaicBwdConfig.for_head_dim(D), *atomic_variants(D)]
    timed = {variant_name(c): (jax.jit(lambda *a, c=c: mosaic_bwd.backward(*a, problem=problem, config=c)),
                               (q, k, v, do, lse2, delta)) for c in configs}

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

    timed["cudnn fwd+bwd"] = (jax.jit(lambda q, k, v, do: jax.vjp(cudnn, q, k, v)[1](do)), (q, k, v, do))
    timed["cudnn fwd"] = (jax.jit(cudnn), (q, k, v))
    for name, (fn, args) in timed.items():
        try:
            row["ms"][name] = 1e3 * median_time(fn, 5, args=args, warmup=1, calls_per_sample=5)
        except Exception as error:  # noqa: BLE001 -- a variant that fails is a result; the rest go on
            row["ms"][name] = None
            print(row["case"], name, "ERROR", repr(error)[:300], flush=True)
    if row["ms"].get("cudnn fwd+bwd") and row["ms"].get("cudnn fwd"):
        row["ms"]["cudnn"] = row["ms"]["cudnn fwd+bwd"] - row["ms"]["cudnn fwd"]
    for name, ms in row["ms"].items():
        if ms is not None and "fwd" not in name:
            print(f"{row['case']} {name}: {ms:.2f} ms, {row['bwd_flops'] / ms / 1e9:.0f} TFLOP/s", flush=True)
    return row


def compare_atomic_variants(out_dir: str, deadline_at: float):
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": [], "timings": []}
    # Each head dim's checks, then its timings: D=128 (where the split variant applies) first.
    for D, shapes in ((128, [(2, 8192, 16, 128, True), (2, 8192, 16, 128, False)]),
                      (64, [(4, 4096, 32, 64, True), (4, 4096, 32, 64, False)])):
        for config in atomic_variants(D):
            if time.perf_counter() > deadline_at:
                print("deadline: unchecked", variant_name(config), f"D={D}", flush=True)
                continue
            try:
                row = check_variant(config, D)
            except Exception as error:  # noqa: BLE001
                row = {"case": f"D={D}", "variant": variant_name(config), "ok": False, "error": repr(error)[:2000]}
            print("check", row, flush=True)
            result["checks"].append(row)
        for shape in shapes:
            if time.perf_counter() > deadline_at:
                print("deadline: skipped", shape, flush=True)
                continue
            result["timings"].append(time_variants(*shape))
            with open(f"{out_dir}/atomic_variants.json", "w") as f:
                json.dump(result, f, indent=1)
    print(f"\nchecks: {sum(c['ok'] for c in result['checks'])}/{len(result['checks'])} ok")
    print("backward TFLOP/s per case:")
    for row in result["timings"]:
        print(row["case"], " | ".join(f"{name} {row['bwd_flops'] / ms / 1e9:.0f}"
                                      for name, ms in row["ms"].items() if ms and "fwd" not in name))


def sweep_shape(B, S, H, D, causal, deadline_at, rows):
    q, k, v, do = attention_inputs(0, B, S, S, H, H, D, jnp.bfloat16)
    problem = problem_for(S, D, causal)
    lse2, delta = backward_inputs(q, k, v, do, problem, D)
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
    parser.add_argument("--atomic-variants", action="store_true",
                        help="compare the reduce-add mode's dQ paths (dq_buffers, dq_chunks, dq_with_dkdv) instead")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    deadline_at = time.perf_counter() + args.deadline
    if args.atomic_variants:
        compare_atomic_variants(args.out, deadline_at)
        return
    rows = []
    for shape in [(2, 8192, 16, 128, True), (4, 4096, 32, 64, True), (2, 8192, 16, 128, False),
                  (4, 4096, 32, 64, False)]:
        sweep_shape(*shape, deadline_at, rows)
        with open(f"{args.out}/bwd_sweep.json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
