"""Tile and variant sweep of the Hopper forward (`mosaic_fwd`) against the portable forward and cuDNN.

    PYTHONPATH=. python3 benchmarks/mosaic_sweep.py --out $OUT/mosaic_sweep.json --deadline 280

Issue 17's cells (D=64 at 4x4096x32, D=128 at 2x8192x16, causal and not). Every kernel runs once
against cuDNN (max abs error: a new variant or tile can be wrong, not only slow), then is timed. The
work runs in passes, most telling first, so that --deadline cuts the least: (0) the two-consumer
kernel on 64x128 tiles on every cell (D=128's default; at D=64 the old default, kept as the
baseline), then at D=64 the three-consumer CTAs (`consumers=3`, the D=64 default: FA3's 192 query
rows, key tiles of 128 or 192; each config on both cells before the next), (1) every other `MosaicFwdConfig` variant (early_k_wait, row_sum_order, persistent,
combinations) on the default tiles, (2) the other tile shapes with the combined variant, (3) the other
tile shapes without variants. Lengths that a CTA's rows or a key tile do not divide (4096 with 192)
are padded once, outside the timed call; TFLOP/s count the real lengths' work only. Each
kernel costs one compile (seconds) and about 20 calls; a kernel is skipped when the time left is
less than the slowest one so far. The JSON is rewritten after every kernel and lists what was skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from benchmarks.flash_attention import BATCHED, Case, samples
from pallas_kernels import flash_attention
from pallas_kernels.fa2 import mosaic_fwd
from pallas_kernels.testing import median_time

# name -> MosaicFwdConfig fields beyond the tiles
VARIANTS = {
    "default": {},
    "early_k": dict(early_k_wait=True),
    "fenced": dict(row_sum_order="fenced"),
    "during_pv": dict(row_sum_order="during_pv"),
    "early_k+fenced": dict(early_k_wait=True, row_sum_order="fenced"),
    "persistent": dict(persistent=True),
    "persistent+early_k": dict(persistent=True, early_k_wait=True),
    "persistent+early_k+fenced": dict(persistent=True, early_k_wait=True, row_sum_order="fenced"),
    "persistent+early_k+during_pv": dict(persistent=True, early_k_wait=True, row_sum_order="during_pv"),
    # Session 19: the persistent grid lost to the grid kernel under a causal band at D=128; the
    # serpentine item order evens out the CTAs' work there (MosaicFwdConfig.serpentine).
    "persistent+serpentine": dict(persistent=True, serpentine=True),
    "persistent+early_k+serpentine": dict(persistent=True, early_k_wait=True, serpentine=True),
}
COMBINED = "persistent+early_k+fenced"  # pass 2's variant: the one expected to win at D=64
DEFAULT_TILES = (64, 128, 2, True, 2)  # (block_q, block_kv, num_stages, ping_pong, consumers)
# Pass 0 at D=64: three consumers of 64 rows (round-robin turns unless ping_pong is off), (variant,
# tiles). FA3 pairs them with 192-key tiles (128 under a causal band); 192 keys take 96 accumulator
# registers per thread of the 160 a consumer gets, so 128 may win here.
# Session 19 (H100): the persistent 128-key kernel with the early K wait (now the D=64 default)
# 490 / 388 causal, the grid kernel 438 / 373, 192-key tiles slower; the serpentine order not timed yet.
THREE_CONSUMERS = [("persistent+early_k", (64, 128, 2, True, 3)), ("persistent+early_k+serpentine", (64, 128, 2, True, 3)),
                   ("default", (64, 128, 2, True, 3))]
# Session 18 timed these below the 64x128 two-stage kernel at the non-causal cell: after pass 1.
THREE_CONSUMERS_LATER = [("persistent+early_k", (64, 192, 2, True, 3))] + [("default", (64, bkv, stages, True, 3)) for bkv, stages in ((128, 3), (192, 2), (192, 3))] + [
    ("default", (64, 192, 2, False, 3)),
]
# Pass 1's order: the variants that won at D=64 first, so that a deadline cuts the least likely ones.
FIRST = ("persistent+serpentine", "persistent", "persistent+early_k+serpentine", "persistent+early_k", "early_k")
PASS1_ORDER = list(FIRST) + [v for v in VARIANTS if v != "default" and v not in FIRST]


def tile_candidates(head_dim: int) -> list[tuple[int, int, int, bool, int]]:
    """Two-consumer tile shapes other than the default that lower for sm90 within shared memory (a
    persistent kernel adds an O slot per consumer: a shape that no longer fits reports its error)."""
    tiles = [(64, 128, 2, False), (64, 64, 2, True), (64, 64, 3, True)]
    if head_dim == 64:
        # At D=64 a tile's matmuls are half as long for the same loads: wider tiles and deeper rings.
        tiles += [(128, 64, 2, True), (128, 64, 3, True), (64, 128, 3, True), (64, 128, 4, True),
                  (128, 64, 4, True), (64, 256, 2, True), (128, 128, 2, True), (128, 128, 2, False)]
    return [t + (2,) for t in tiles]


def cells(head_dims) -> list[tuple[Case, mosaic_fwd.MosaicProblem]]:
    out = []
    for D in head_dims:
        for causal in (False, True):
            # Issue 17's cells: D=64 trails the peers most at 4x4096x32x64.
            case = Case(2, 8192, 16, D, causal) if D == 128 else Case(4, 4096, 32, D, causal)
            problem = mosaic_fwd.MosaicProblem(
                q_len=case.seq_len, kv_len=case.seq_len, q_offset=0, window_left=-1,
                window_right=0 if causal else -1, sm_scale=D ** -0.5, group_size=1)
            out.append((case, problem))
    return out


def plan(head_dims) -> list[tuple[int, str, tuple]]:
    """(cell index, variant, tiles) in the order they run: the passes of the docstring."""
    cell_dims = [D for D in head_dims for _causal in (False, True)]  # as `cells` orders them
    # The default first on every cell: the error check of each later kernel is relative to it.
    todo = [(c, "default", DEFAULT_TILES) for c in range(len(cell_dims))]
    todo += [(c, name, tiles) for name, tiles in THREE_CONSUMERS for c, D in enumerate(cell_dims) if D == 64]
    todo += [(c, name, DEFAULT_TILES) for name in PASS1_ORDER for c in range(len(cell_dims))]
    todo += [(c, name, tiles) for name, tiles in THREE_CONSUMERS_LATER for c, D in enumerate(cell_dims) if D == 64]
    for variant in (COMBINED, "default"):
        todo += [(c, variant, tiles) for c, D in enumerate(cell_dims) for tiles in tile_candidates(D)]
    return todo


def label(variant: str, tiles) -> str:
    bq, bkv, stages, ping_pong, consumers = tiles
    return f"mosaic {bq}x{bkv} s{stages}{' pp' if ping_pong else ''}{' 3wg' if consumers == 3 else ''} {variant}"


def padded(q, k, v, config: mosaic_fwd.MosaicFwdConfig):
    """q [B, T, H, D] and k, v [B, S, K, D] zero-padded to multiples of the config's CTA rows and key
    tile (the problem's q_len and kv_len stay the real ones: padded keys are masked, padded rows cut)."""
    def pad(x, multiple):
        extra = -x.shape[1] % multiple
        return x if extra == 0 else jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
    return pad(q, config.cta_rows), pad(k, config.block_kv), pad(v, config.block_kv)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--deadline", type=float, default=280.0,
                        help="seconds from start after which the remaining kernels are skipped")
    args = parser.parse_args()
    start = time.monotonic()
    slowest = 0.0  # seconds of the slowest kernel so far (compile, error check, timing)
    cell_list = cells(args.head_dims)
    rows = [{"case": case.label} for case, _ in cell_list]
    results, skipped = [], []
    arrays = {}  # cell -> (q, k, v, cuDNN output in f32)
    default_err = {}  # cell -> max error of the default kernel (pass 1 runs it first on each cell)

    def save():
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                       "elapsed_s": round(time.monotonic() - start, 1), "peers": rows,
                       "results": results, "skipped": skipped}, f, indent=1)

    def inputs(c):
        if c not in arrays:
            case, _ = cell_list[c]
            q, k, v, _ = case.inputs(jnp.bfloat16)
            cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=case.causal, implementation="cudnn"))
            portable = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=case.causal, backend="portable"))
            for name, fn in (("cudnn", cudnn), ("portable", portable)):
                rows[c][name] = case.flops() / median_time(fn, samples(args.repeats), args=(q, k, v),
                                                           **BATCHED) / 1e12
            print(json.dumps(rows[c]), flush=True)
            arrays[c] = (q, k, v, cudnn(q, k, v).astype(jnp.float32))
        return arrays[c]

    for c, variant, tiles in plan(args.head_dims):
        case, problem = cell_list[c]
        key = label(variant, tiles)
        if time.monotonic() - start + slowest > args.deadline:
            skipped.append(f"{case.label} {key}")
            continue
        q, k, v, ref = inputs(c)  # the cell's peers run on its first kernel, outside its seconds
        t0 = time.monotonic()
        bq, bkv, stages, ping_pong, consumers = tiles
        result = {"case": case.label, "variant": variant, "tiles": list(tiles), "name": key}
        try:
            config = dataclasses.replace(mosaic_fwd.MosaicFwdConfig(
                block_q=bq, block_kv=bkv, num_stages=stages, ping_pong=ping_pong, consumers=consumers),
                **VARIANTS[variant])
            fn = jax.jit(lambda q, k, v, config=config, problem=problem:
                         mosaic_fwd.forward(q, k, v, problem=problem, config=config)[0])
            qp, kp, vp = padded(q, k, v, config)
            out = fn(qp, kp, vp)[:, :q.shape[1]]
            err = result["max_err_vs_cudnn"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
            # Wrong, not rounding: more than twice the default kernel's error on this cell plus 2 bf16
            # ulps at 1 (outputs are averages of values below 1 in magnitude).
            if (variant, tiles) == ("default", DEFAULT_TILES):
                default_err[c] = err
            result["suspect"] = c in default_err and err > 2 * default_err[c] + 2 ** -7
            result["tflops"] = case.flops() / median_time(fn, samples(args.repeats), args=(qp, kp, vp),
                                                          **BATCHED) / 1e12
            result["vs_cudnn"] = result["tflops"] / rows[c]["cudnn"]
        except Exception as error:
            result["error"] = repr(error)[:400]
        result["seconds"] = round(time.monotonic() - t0, 1)
        slowest = max(slowest, result["seconds"])
        results.append(result)
        print(json.dumps(result), flush=True)
        save()
    save()
    print(f"done in {time.monotonic() - start:.0f} s; skipped {len(skipped)} (past --deadline "
          f"{args.deadline:.0f} s):", *skipped, sep="\n  ", flush=True)
    for row in rows:  # the table: best kernels per cell
        best = sorted((r for r in results if r["case"] == row["case"] and "tflops" in r),
                      key=lambda r: -r["tflops"])[:5]
        print(row, *(f"  {r['tflops']:.0f} TFLOP/s ({r['vs_cudnn']:.2f}x cuDNN, err "
                     f"{r['max_err_vs_cudnn']:.3g}{' SUSPECT' if r['suspect'] else ''}) {r['name']}"
                     for r in best), sep="\n", flush=True)
    suspects = [r["case"] + " " + r["name"] for r in results if r.get("suspect")]
    print(f"{len(suspects)} kernels off cuDNN by more than 2x the default's error:", *suspects,
          sep="\n  ", flush=True)


if __name__ == "__main__":
    main()
