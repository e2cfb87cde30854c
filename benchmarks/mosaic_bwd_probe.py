"""GPU probe of the Hopper backward: correctness on a small grid, then fwd/bwd TFLOP/s vs the peers.

    PYTHONPATH=. python benchmarks/mosaic_bwd_probe.py --out $OUT [--variants a,b] [--skip-check]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, "tests")
from pallas_kernels import attention_reference, flash_attention  # noqa: E402
from pallas_kernels.testing import attention_inputs, median_time, within_xla_error  # noqa: E402
from test_flash_attention import _output_and_grads  # noqa: E402


def check(B, T, S, H, K, D, dtype=jnp.bfloat16, atomic=False, **kw):
    q, k, v, do = attention_inputs(1, B, T, S, H, K, D, dtype)
    fn = (lambda q, k, v, **kw: _atomic(q, k, v, kw.pop("causal", False))) if atomic and set(kw) <= {"causal"} else \
        functools.partial(flash_attention, backend="mosaic")
    ours = jax.jit(lambda *a: _output_and_grads(fn, *a, **kw))(q, k, v, do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    exact = jax.jit(lambda *a: _output_and_grads(attention_reference, *a, **kw))(*f32)
    same = jax.jit(lambda *a: _output_and_grads(functools.partial(
        attention_reference, compute_dtype=dtype, precision=jax.lax.Precision.DEFAULT), *a, **kw))(q, k, v, do)
    worst = []
    for name, a, e, s in zip(("out", "dq", "dk", "dv"), ours, exact, same):
        rule = within_xla_error(a, e, s, dtype)
        worst.append(f"{name}:{rule['err']:.2e}/{rule['xla_err']:.2e}{'' if rule['ok'] else ' FAIL'}")
    print(f"check {B}x{T}x{S}x{H}/{K}x{D} {kw} atomic={atomic}: " + " ".join(worst), flush=True)
    return all("FAIL" not in w for w in worst)


def _atomic(q, k, v, causal):
    """Ours with the nondeterministic (TMA reduce-add) dQ."""
    return flash_attention(q, k, v, causal=causal, backend="mosaic", deterministic=False)


def peers(causal):
    impls = {
        "ours-atomic": lambda q, k, v: _atomic(q, k, v, causal),
        "ours": lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="mosaic"),
        "ours-portable-bwd": lambda q, k, v: flash_attention(q, k, v, causal=causal, backend=("mosaic", "portable")),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"),
    }
    try:
        import tokamax
        impls["tokamax-mosaic"] = lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, is_causal=causal, implementation="mosaic")
    except Exception as error:  # noqa: BLE001
        print("no tokamax:", repr(error)[:200])
    return impls


def bench(B, S, H, D, causal, only=None):
    q, k, v, do = attention_inputs(0, B, S, S, H, H, D, jnp.bfloat16)
    flops = 4.0 * B * S * S * H * D / (2 if causal else 1)
    row = {"case": f"{B}x{S}x{H}x{D}{' causal' if causal else ''}"}
    for name, fn in peers(causal).items():
        if only and name not in only:
            continue
        try:
            t_f = median_time(jax.jit(fn), 5, args=(q, k, v), warmup=2, calls_per_sample=10)
            t_a = median_time(jax.jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do)), 5,
                              args=(q, k, v, do), warmup=2, calls_per_sample=10)
            row[name] = (flops / t_f / 1e12, 2.5 * flops / max(t_a - t_f, 1e-9) / 1e12)
        except Exception as error:  # noqa: BLE001
            row[name] = repr(error)[:300]
        print(row["case"], name, row[name], flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated implementations to time")
    parser.add_argument("--deadline", type=float, default=1e9, help="stop timing new cases after these seconds")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    if not args.skip_check:
        for kw in [dict(B=1, T=333, S=517, H=4, K=2, D=128, causal=True),
                   dict(B=2, T=512, S=512, H=4, K=1, D=64, causal=True),
                   dict(B=1, T=600, S=900, H=4, K=2, D=128, window_size=(100, 20)),
                   dict(B=2, T=1024, S=1024, H=4, K=2, D=128, atomic=True),
                   dict(B=1, T=333, S=517, H=4, K=2, D=256, causal=True),
                   dict(B=1, T=333, S=517, H=4, K=2, D=128, causal=True, atomic=True)]:
            try:
                check(**kw)
            except Exception as error:  # noqa: BLE001
                print("check", kw, "ERROR", repr(error)[:1500], flush=True)
    only = [x for x in args.only.split(",") if x]
    rows = []
    start = time.perf_counter()
    # Most important first: the deadline cuts the tail.
    cases = [(2, 8192, 16, 128, False), (2, 8192, 16, 128, True), (4, 4096, 32, 64, False),
             (1, 16384, 16, 128, True), (4, 4096, 32, 64, True), (1, 16384, 16, 128, False),
             (2, 8192, 8, 256, True)]
    for B, S, H, D, causal in cases:
        if time.perf_counter() - start > args.deadline:
            print("deadline reached before", (B, S, H, D, causal), flush=True)
            break
        rows.append(bench(B, S, H, D, causal, only))
    with open(f"{args.out}/probe.json", "w") as f:
        json.dump(rows, f, indent=1)
    if not rows:
        return
    print("\ncase | " + " | ".join(n for n in rows[0] if n != "case"))
    for row in rows:
        cells = [f"{v[0]:.0f}/{v[1]:.0f}" if isinstance(v, tuple) else "err" for n, v in row.items() if n != "case"]
        print(row["case"], "|", " | ".join(cells))


if __name__ == "__main__":
    main()
