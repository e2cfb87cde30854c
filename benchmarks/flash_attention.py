"""FlashAttention-2 benchmark: our Pallas kernels vs cuDNN, XLA, JAX's Pallas-Triton mha and tokamax.

Runs on one GPU, all peers in the same process. Checks correctness first (errors vs an f32 reference,
next to XLA's error in the same dtype), then times forward and forward+backward (median of repeated
runs after warm-up; backward = (fwd+bwd) - fwd), prints a table last, and writes JSON + a PNG.

    PYTHONPATH=. python benchmarks/flash_attention.py --out /tmp/fa2 [--quick] [--sweep]

FLOPs: forward 4*B*T*S*H*D (halved when causal), backward 2.5x the forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockSizes, attention_reference, flash_attention
from pallas_kernels.testing import attention_inputs, median_time

# Each timing sample is 5 calls back to back (the host's dispatch hides behind the GPU's work), after two
# warm-up calls; a run of `repeats` calls takes max(3, repeats // 5) samples.
BATCHED = dict(warmup=2, calls_per_sample=5)


def samples(repeats: int) -> int:
    return max(3, repeats // 5)


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq_len: int
    num_heads: int
    head_dim: int
    causal: bool

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq_len}x{self.num_heads}x{self.head_dim}{' causal' if self.causal else ''}"

    def flops(self) -> float:
        f = 4.0 * self.batch * self.seq_len ** 2 * self.num_heads * self.head_dim
        return f / 2 if self.causal else f

    def inputs(self, dtype, seed: int = 0):
        """q, k, v, do: [B, T, H, D] each (T = S, as many KV heads as query heads)."""
        return attention_inputs(seed, self.batch, self.seq_len, self.seq_len, self.num_heads, self.num_heads,
                                self.head_dim, dtype)


def _peers(case: Case):
    """name -> attention(q, k, v) for every implementation that can run here."""
    scale = case.head_dim ** -0.5
    impls = {
        "fa2jax": lambda q, k, v: flash_attention(q, k, v, causal=case.causal),
        "fa2jax-portable": lambda q, k, v: flash_attention(q, k, v, causal=case.causal, backend="portable"),
        "fa2jax-mosaic": lambda q, k, v: flash_attention(q, k, v, causal=case.causal, backend="mosaic"),
        "fa2jax-mosaic-atomic": lambda q, k, v: flash_attention(
            q, k, v, causal=case.causal, backend="mosaic", deterministic=False),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=case.causal, implementation="cudnn"),
    }
    if case.batch * case.seq_len * case.seq_len * case.num_heads * 4 <= 24 * 2 ** 30:
        impls["xla"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=case.causal, implementation="xla")
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_mha
        blocks = pallas_mha.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64,
                                       block_q_dq=64, block_kv_dq=64)
        impls["jax-pallas-triton"] = lambda q, k, v: pallas_mha.mha(
            q, k, v, None, sm_scale=scale, causal=case.causal, block_sizes=blocks,
            num_warps=4, num_stages=3)
    except ImportError as error:
        print("no JAX Pallas mha:", error)
    try:
        import tokamax
        for backend in ("triton", "mosaic"):
            impls[f"tokamax-{backend}"] = (lambda backend: lambda q, k, v: tokamax.dot_product_attention(
                q, k, v, is_causal=case.causal, implementation=backend))(backend)
    except Exception as error:  # tokamax travels as wheels; its absence is reported, not fatal
        print("no tokamax:", repr(error))
    return impls


def bench_case(case: Case, dtype, repeats: int, only: list[str] | None = None) -> dict:
    q, k, v, do = case.inputs(dtype)
    row = {"case": case.label, **dataclasses.asdict(case)}
    for name, attn in _peers(case).items():
        if only and name not in only:
            continue
        fwd = jax.jit(attn)

        def fwd_bwd(q, k, v, do, attn=attn):
            out, vjp = jax.vjp(attn, q, k, v)
            return vjp(do)

        try:
            t_fwd = median_time(fwd, samples(repeats), args=(q, k, v), **BATCHED)
            t_all = median_time(jax.jit(fwd_bwd), samples(repeats), args=(q, k, v, do), **BATCHED)
        except Exception as error:
            row[name] = {"error": repr(error)[:300]}
            print(f"  {case.label} {name}: FAILED {repr(error)[:300]}")
            continue
        t_bwd = max(t_all - t_fwd, 1e-9)
        row[name] = {
            "fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3,
            "fwd_tflops": case.flops() / t_fwd / 1e12,
            "bwd_tflops": 2.5 * case.flops() / t_bwd / 1e12,
        }
        print(f"  {case.label:28s} {name:18s} fwd {row[name]['fwd_tflops']:6.1f} "
              f"bwd {row[name]['bwd_tflops']:6.1f} TFLOP/s", flush=True)
    return row


def check_correctness(dtype) -> list[dict]:
    """Kernel error vs f32 reference, next to XLA's error in the same dtype, over a feature grid."""
    results = []
    B, T, S, H, K, D = 2, 333, 517, 8, 2, 80
    q, k, v, do = attention_inputs(1, B, T, S, H, K, D, dtype)
    segment_key = jax.random.key(2)
    segments = (jnp.cumsum(jax.random.bernoulli(segment_key, 0.01, (B, T)), 1),
                jnp.cumsum(jax.random.bernoulli(segment_key, 0.01, (B, S)), 1))
    grid = {
        "plain": {}, "causal": {"causal": True}, "window": {"window_size": (64, 16)},
        "segments": {"segment_ids": segments}, "softcap+alibi": {"softcap": 20.0, "alibi_slopes": jnp.linspace(0.01, 0.1, H)},
        "dropout": {"dropout_rate": 0.1, "dropout_seed": 3},
    }
    f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
    for name, kwargs in grid.items():
        def grads(fn, q, k, v, do):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kwargs), q, k, v)
            return (out,) + vjp(do)
        ours = jax.jit(lambda *a: grads(flash_attention, *a))(q, k, v, do)
        exact = jax.jit(lambda *a: grads(attention_reference, *a))(*f32(q, k, v, do))
        same_dtype = jax.jit(lambda *a: grads(
            lambda q, k, v, **kw: attention_reference(q, k, v, precision=jax.lax.Precision.DEFAULT, **kw), *a))(
            q, k, v, do)
        row = {"feature": name}
        for label, a, b, c in zip(("out", "dq", "dk", "dv"), ours, exact, same_dtype):
            err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
            base = float(jnp.max(jnp.abs(c.astype(jnp.float32) - b)))
            row[label] = (err, base)
        row["ok"] = all(e <= 2 * b + 1e-6 and np.isfinite(e) for e, b in (row[x] for x in ("out", "dq", "dk", "dv")))
        print(f"  correctness {name:14s} ok={row['ok']} " + " ".join(
            f"{x}={row[x][0]:.2e}/{row[x][1]:.2e}" for x in ("out", "dq", "dk", "dv")), flush=True)
        results.append(row)
    return results


def sweep(case: Case, dtype, repeats: int) -> list[dict]:
    """Times our kernel over block-size candidates on one case; the best goes to the tuning cache."""
    q, k, v, do = case.inputs(dtype)
    rows = []
    fwd_candidates = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
                      (128, 64, 4, 4), (64, 128, 4, 3), (128, 32, 4, 4)]
    # (dkv block_q, dkv block_k, dq block_q, dq block_k, warps, stages)
    bwd_candidates = [(64, 64, 64, 64, 4, 2), (64, 64, 64, 64, 4, 3), (32, 64, 64, 32, 4, 2),
                      (64, 128, 128, 64, 8, 2), (32, 128, 128, 32, 4, 2), (64, 64, 128, 64, 4, 2),
                      (32, 64, 64, 64, 4, 3), (64, 32, 32, 64, 4, 2), (128, 64, 64, 128, 8, 2)]
    for bq, bk, warps, stages in fwd_candidates:
        blocks = BlockSizes(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
        try:
            t = median_time(jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=case.causal, block_sizes=blocks)),
                            samples(repeats), args=(q, k, v), **BATCHED)
            rows.append({"kind": "fwd", "blocks": [bq, bk, warps, stages], "tflops": case.flops() / t / 1e12})
        except Exception as error:
            rows.append({"kind": "fwd", "blocks": [bq, bk, warps, stages], "error": repr(error)[:200]})
        print("  sweep", case.label, rows[-1], flush=True)
    for bq, bk, dq_q, dq_k, warps, stages in bwd_candidates:
        blocks = BlockSizes(block_q_dkv=bq, block_k_dkv=bk, block_q_dq=dq_q, block_k_dq=dq_k,
                            num_warps_bwd=warps, num_stages_bwd=stages)

        def fwd_bwd(q, k, v, do):
            out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=case.causal, block_sizes=blocks), q, k, v)
            return vjp(do)
        try:
            t_fwd = median_time(jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=case.causal, block_sizes=blocks)),
                                samples(repeats), args=(q, k, v), **BATCHED)
            t = median_time(jax.jit(fwd_bwd), samples(repeats), args=(q, k, v, do), **BATCHED) - t_fwd
            rows.append({"kind": "bwd", "blocks": [bq, bk, dq_q, dq_k, warps, stages],
                         "tflops": 2.5 * case.flops() / t / 1e12})
        except Exception as error:
            rows.append({"kind": "bwd", "blocks": [bq, bk, dq_q, dq_k, warps, stages], "error": repr(error)[:200]})
        print("  sweep", case.label, rows[-1], flush=True)
    return rows


def peak_memory_128k(dtype) -> dict:
    """fwd+bwd at B=1, S=128k, H=16, D=128: must run; reports the device's peak bytes in use."""
    case = Case(1, 131072, 16, 128, True)
    q, k, v, do = case.inputs(dtype)

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=True), q, k, v)
        return vjp(do)
    run = jax.jit(fwd_bwd)
    start = time.perf_counter()
    jax.block_until_ready(run(q, k, v, do))
    compiled_and_ran = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(run(q, k, v, do))
    seconds = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    return {"seconds_incl_compile": compiled_and_ran, "seconds_fwd_bwd": seconds,
            "fwd_bwd_tflops": 3.5 * case.flops() / seconds / 1e12,
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "inputs_bytes": 4 * q.size * q.dtype.itemsize}


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({n for r in rows for n, v in r.items() if isinstance(v, dict) and "fwd_tflops" in v})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, metric in zip(axes, ("fwd_tflops", "bwd_tflops")):
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            values = [r.get(name, {}).get(metric, 0) for r in rows]
            ax.bar(np.arange(len(rows)) + i * width, values, width, label=name)
        ax.set_xticks(np.arange(len(rows)) + 0.4, [r["case"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(metric.replace("_tflops", ""))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out"))
    parser.add_argument("--quick", action="store_true",
                        help="only the headline cases (2x8192x16x128, 4x4096x32x64, 1x16384x16x128)")
    parser.add_argument("--sweep", action="store_true", help="also sweep block sizes on the headline case")
    parser.add_argument("--memory", action="store_true", help="also the 128k-token peak-memory run")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the 128k-token run, first in a fresh process so that no other case "
                             "inflates the device's peak-bytes counter")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384],
                        help="S per case; B = 16384 // S so every case has 16k tokens")
    parser.add_argument("--no-correctness", action="store_true")
    parser.add_argument("--peers", nargs="+", help="only these implementations (default: all)")
    parser.add_argument("--tag", default="", help="suffix of the JSON/PNG file names")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = jnp.bfloat16
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    print(report, flush=True)
    if args.memory_only:
        report["memory_128k"] = peak_memory_128k(dtype)
        print("  memory_128k", report["memory_128k"], flush=True)
        (args.out / f"flash_attention_memory{args.tag}.json").write_text(json.dumps(report, indent=1, default=str))
        return
    if not args.no_correctness:
        report["correctness"] = check_correctness(dtype)
    headline = [Case(2, 8192, 16, 128, c) for c in (False, True)] + [
        Case(4, 4096, 32, 64, c) for c in (False, True)] + [Case(1, 16384, 16, 128, c) for c in (False, True)]
    if args.quick:
        cases = headline
    else:
        cases = [
            Case(16384 // s, s, 16 if d >= 128 else 32, d, c)
            for d in args.head_dims for s in args.seq_lens for c in (False, True)
        ]
        cases = list(dict.fromkeys(cases))
    if args.sweep:
        report["sweep"] = [sweep(case, dtype, args.repeats) for case in headline]
    rows = []
    for case in cases:
        try:
            rows.append(bench_case(case, dtype, args.repeats, args.peers))
        except Exception:
            traceback.print_exc()
    report["rows"] = rows
    if args.memory:
        try:
            report["memory_128k"] = peak_memory_128k(dtype)
        except Exception as error:
            report["memory_128k"] = {"error": repr(error)[:300]}
        print("  memory_128k", report["memory_128k"], flush=True)
    (args.out / f"flash_attention{args.tag}.json").write_text(json.dumps(report, indent=1, default=str))
    plot(rows, args.out / f"flash_attention{args.tag}.png")

    names = sorted({n for r in rows for n, v in r.items() if isinstance(v, dict) and "fwd_tflops" in v})
    print("\n| case | " + " | ".join(names) + " |  (fwd / bwd TFLOP/s, bf16)")
    print("|---|" + "---|" * len(names))
    for r in rows:
        cells = []
        for n in names:
            cell = r.get(n, {})
            cells.append(f"{cell['fwd_tflops']:.0f} / {cell['bwd_tflops']:.0f}" if "fwd_tflops" in cell else "-")
        print(f"| {r['case']} | " + " | ".join(cells) + " |")
    print("\nratio of our own kernels (best of fa2jax-mosaic, fa2jax-mosaic-atomic) to the best peer:")
    for r in rows:
        print(f"  {r['case']}: " + ", ".join(f"{m} {x:.2f}" if x else f"{m} -" for m, x in ratios(r).items()))


OURS = ("fa2jax-mosaic", "fa2jax-mosaic-atomic")
PEERS = ("cudnn", "tokamax-mosaic", "tokamax-triton", "jax-pallas-triton", "xla")


def ratios(row: dict) -> dict:
    """fwd/bwd TFLOP/s of our best Hopper variant over the best peer's, in one row (None if absent)."""
    out = {}
    for metric in ("fwd_tflops", "bwd_tflops"):
        ours = [row[n][metric] for n in OURS if metric in row.get(n, {})]
        peers = [row[n][metric] for n in PEERS if metric in row.get(n, {})]
        out[metric.split("_")[0]] = max(ours) / max(peers) if ours and peers else None
    return out


if __name__ == "__main__":
    main()
