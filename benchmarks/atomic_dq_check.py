"""GPU check of the reduce-add dQ mode (`deterministic=False`) of the Hopper backward: does it lower
and run on this jax, are its out/dQ/dK/dV right, and how fast is fwd+bwd next to the deterministic
mode and cuDNN.

    PYTHONPATH=. python benchmarks/atomic_dq_check.py --out $OUT   # meant for under 150 s on an H100

It sets FA2JAX_ATOMIC_DQ=1 before anything is traced, so the reduce-add kernel is tried even where
`mosaic_bwd.atomic_dq_available` would turn it off, and it counts the Mosaic GPU kernels in each
lowering (2 with the reduce-add dQ, 3 with the dQ kernel) so that a silent fallback shows. A variant
that fails to lower, compile or run prints its traceback, jax's frames included (the next error to
fix; the JSON keeps all of it), and the run goes on; --verbose-errors adds the failing equation and
its kernel's jaxpr. Correctness, per output: |ours - f32 reference| <= 2 |XLA in bf16 - f32
reference| + 16 ulp * max|reference| (`pallas_kernels.testing.within_xla_error`).
Timing: median of 5 samples of 5 back-to-back calls, compile excluded; TFLOP/s count 4 B T S H D
(halved when causal) for the forward and 2.5x that for the backward (fwd+bwd = 3.5x). --deadline
stops starting timing cases. Results: OUT/atomic_dq_check.json.
"""
from __future__ import annotations

import os

os.environ["FA2JAX_ATOMIC_DQ"] = "1"  # before pallas_kernels is used: try the reduce-add mode whatever the rule says
os.environ.setdefault("JAX_TRACEBACK_FILTERING", "off")  # a lowering error's traceback keeps jax's frames

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, "tests")
from pallas_kernels import attention_reference, flash_attention  # noqa: E402
from pallas_kernels.testing import attention_inputs, median_time, within_xla_error  # noqa: E402
from test_flash_attention import _output_and_grads  # noqa: E402

# (B, T, S, H, K, D, keyword arguments): a small GQA case, the realistic shapes, and the mask paths
# (padded T != S under a causal band, a window, segment ids).
CHECKS = [
    (1, 1024, 1024, 8, 2, 128, dict(causal=True)),
    (2, 4096, 4096, 16, 16, 128, {}),
    (4, 2048, 2048, 32, 8, 64, dict(causal=True)),
    (1, 333, 517, 4, 2, 128, dict(causal=True)),
    (1, 600, 900, 4, 2, 128, dict(window_size=(100, 20))),
    (2, 1024, 1024, 8, 2, 64, dict(causal=True, segments=4)),
]
# (B, S, H, D, causal), most important first: --deadline cuts the tail.
TIMINGS = [(2, 8192, 16, 128, True), (2, 8192, 16, 128, False), (4, 4096, 32, 64, True),
           (4, 4096, 32, 64, False)]
MOSAIC_KERNELS = {"atomic": 2, "deterministic": 3}  # forward + dK/dV (+ dQ) in one fwd+bwd lowering


def _failed(what: str, error: str) -> None:
    """Prints a failure; the JSON keeps the whole traceback, the log its last 20000 characters."""
    print(f"{what} FAILED\n{error[-20000:]}", flush=True)


def _mode(name: str, causal: bool, **kwargs):
    """fn(q, k, v) -> out for one backward mode: ours with reduce-add dQ, ours deterministic, cuDNN."""
    if name == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    return functools.partial(flash_attention, causal=causal, backend="mosaic",
                             deterministic=name == "deterministic", **kwargs)


def _fwd_bwd(fn):
    return lambda q, k, v, do: _output_and_grads(fn, q, k, v, do)


def _compile(fn, *args):
    """(compiled fn, Mosaic GPU kernels in its lowering)."""
    lowered = jax.jit(fn).lower(*args)
    kernels = len(re.findall(r"custom_call @mosaic_gpu\w*\(", lowered.as_text()))
    return lowered.compile(), kernels


def _segment_ids(B, T, docs):
    """[B, T] int32: `docs` equal documents packed one after another."""
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) * docs // T, (B, T))


def check(B, T, S, H, K, D, kwargs, dtype=jnp.bfloat16) -> dict:
    name = f"{B}x{T}x{S}x{H}/{K}x{D} {kwargs}"
    row = {"case": name, "mode": "atomic"}
    kwargs = dict(kwargs)
    if docs := kwargs.pop("segments", 0):
        if T != S:
            raise ValueError(f"segment ids here need T == S, got {T=}, {S=}")
        kwargs["segment_ids"] = _segment_ids(B, T, docs)
    causal = kwargs.pop("causal", False)
    q, k, v, do = attention_inputs(1, B, T, S, H, K, D, dtype)
    try:
        start = time.perf_counter()
        compiled, row["mosaic_kernels"] = _compile(_fwd_bwd(_mode("atomic", causal, **kwargs)), q, k, v, do)
        row["compile_s"] = round(time.perf_counter() - start, 1)
        ours = jax.block_until_ready(compiled(q, k, v, do))
    except Exception:  # noqa: BLE001 -- the point is to see the next error and go on
        row["error"] = traceback.format_exc()
        _failed(f"check {name}", row["error"])
        return row
    reference = functools.partial(attention_reference, causal=causal, **kwargs)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    exact = jax.jit(_fwd_bwd(reference))(*f32)
    same = jax.jit(_fwd_bwd(functools.partial(reference, compute_dtype=dtype,
                                              precision=jax.lax.Precision.DEFAULT)))(q, k, v, do)
    row["ok"] = row["mosaic_kernels"] == MOSAIC_KERNELS["atomic"]
    for what, a, e, s in zip(("out", "dq", "dk", "dv"), ours, exact, same):
        row[what] = within_xla_error(a, e, s, dtype)
        row["ok"] &= row[what]["ok"]
    errors = " ".join(f"{w}:{row[w]['err']:.2e}/{row[w]['xla_err']:.2e}{'' if row[w]['ok'] else ' FAIL'}"
                      for w in ("out", "dq", "dk", "dv"))
    print(f"check {name}: {'ok' if row['ok'] else 'WRONG'} kernels={row['mosaic_kernels']} "
          f"compile={row['compile_s']}s {errors}", flush=True)
    return row


def _time(fn, *args) -> tuple[float, int]:
    compiled, kernels = _compile(fn, *args)
    return median_time(compiled, 5, args=args, warmup=2, calls_per_sample=5), kernels


def bench(B, S, H, D, causal) -> dict:
    q, k, v, do = attention_inputs(0, B, S, S, H, H, D, jnp.bfloat16)
    flops = 4.0 * B * S * S * H * D / (2 if causal else 1)
    row = {"case": f"{B}x{S}x{H}x{D}{' causal' if causal else ''}"}
    forward = {}  # implementation -> forward seconds (ours is the same kernel in both modes)
    for impl, forward_of in (("ours", "atomic"), ("cudnn", "cudnn")):
        try:
            forward[impl], _ = _time(_mode(forward_of, causal), q, k, v)
        except Exception:  # noqa: BLE001
            row[f"{impl}-forward error"] = traceback.format_exc()
            _failed(f"{row['case']} {impl} forward", row[f"{impl}-forward error"])
    for mode in ("atomic", "deterministic", "cudnn"):
        try:
            t, kernels = _time(_fwd_bwd(_mode(mode, causal)), q, k, v, do)
        except Exception:  # noqa: BLE001
            row[mode] = {"error": traceback.format_exc()}
            _failed(f"{row['case']} {mode}", row[mode]["error"])
            continue
        t_fwd = forward.get("cudnn" if mode == "cudnn" else "ours")
        row[mode] = {"fwd_bwd_ms": t * 1e3, "fwd_bwd_tflops": 3.5 * flops / t / 1e12,
                     "bwd_tflops": None if t_fwd is None else 2.5 * flops / max(t - t_fwd, 1e-9) / 1e12,
                     "mosaic_kernels": kernels}
        if mode in MOSAIC_KERNELS and kernels != MOSAIC_KERNELS[mode]:
            row[mode]["warning"] = f"expected {MOSAIC_KERNELS[mode]} Mosaic kernels, lowered {kernels}"
        print(f"{row['case']} {mode}: {row[mode]}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp", help="folder for atomic_dq_check.json")
    parser.add_argument("--skip-check", action="store_true", help="timings only")
    parser.add_argument("--skip-timing", action="store_true", help="correctness only")
    parser.add_argument("--deadline", type=float, default=130.0,
                        help="start no timing case after this many seconds from the start")
    parser.add_argument("--verbose-errors", action="store_true",
                        help="Pallas lowering errors name the failing equation (jax_pallas_verbose_errors)")
    args = parser.parse_args()
    jax.config.update("jax_pallas_verbose_errors", args.verbose_errors)
    start = time.perf_counter()
    device = jax.devices()[0]
    result = {"device": device.device_kind, "jax": jax.__version__, "checks": [], "timings": []}
    print(device.device_kind, "jax", jax.__version__, flush=True)
    if not args.skip_check:
        for B, T, S, H, K, D, kwargs in CHECKS:
            result["checks"].append(check(B, T, S, H, K, D, kwargs))
    if not args.skip_timing:
        for case in TIMINGS:
            if time.perf_counter() - start > args.deadline:
                print("deadline reached before timing", case, flush=True)
                result["timings"].append({"case": str(case), "skipped": "deadline"})
                continue
            result["timings"].append(bench(*case))
    result["seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.out, "atomic_dq_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nchecks: {sum(bool(c.get('ok')) for c in result['checks'])}/{len(result['checks'])} ok")
    print("fwd+bwd TFLOP/s (bwd TFLOP/s): case | atomic | deterministic | cudnn")
    for row in result["timings"]:
        cells = []
        for mode in ("atomic", "deterministic", "cudnn"):
            cell = row.get(mode) or {}
            cells.append("err" if "fwd_bwd_tflops" not in cell else
                         f"{cell['fwd_bwd_tflops']:.0f} ({cell['bwd_tflops'] or 0:.0f})")
        print(row["case"], "|", " | ".join(cells))
    print(f"total {result['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
