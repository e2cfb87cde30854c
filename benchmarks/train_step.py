"""End-to-end training line: tokens/s of one preset's train step with each attention implementation.

    PYTHONPATH=. python benchmarks/train_step.py --out $OUT [--preset target-1b] [--attention pallas cudnn]

The same model, optimizer and batch (`examples/train.py`'s `make_train_step`, bf16 compute), one
GPU, only `attention_impl` changing: "pallas" is our FlashAttention-2 (the Hopper kernels where they
apply), "cudnn" is `jax.nn.dot_product_attention(implementation="cudnn")`. Rows hold documents of
`--segment-len` tokens (the default: one document per row). Writes `train_step.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from scale_out import _time_train_step  # noqa: E402  (the same timed step as the scaling runs)

from fa2jax.training import presets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for train_step.json")
    parser.add_argument("--preset", default="target-1b", choices=sorted(presets()), help="model to train")
    parser.add_argument("--attention", nargs="+", default=["pallas", "cudnn"],
                        choices=["pallas", "cudnn", "xla"], help="attention implementations to compare")
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    parser.add_argument("--segment-len", type=int, default=None, help="tokens per document (default: --seq-len)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    args = parser.parse_args()
    if args.batch < 1 or args.seq_len < 2 or args.steps < 1:
        parser.error(f"--batch, --seq-len and --steps must be positive, got {args.batch=}, {args.seq_len=}, "
                     f"{args.steps=}")
    run = presets()[args.preset]
    cfg = dataclasses.replace(run.train, batch_size=args.batch, grad_accum=1, seq_len=args.seq_len, warmup_steps=0)
    print(jax.devices()[0].device_kind, jax.__version__, args.preset, flush=True)
    rows = []
    for impl in args.attention:
        config = run.model.replace(param_dtype=jnp.float32, attention_impl=impl, max_len=args.seq_len)
        try:
            seconds, loss, params = _time_train_step(config, cfg, 1, None, args.steps,
                                                     segment_len=args.segment_len or args.seq_len)
            row = {"attention": impl, "seconds_per_step": seconds,
                   "tokens_per_s": cfg.tokens_per_step / seconds, "loss": loss, "params": params}
        except Exception as error:  # noqa: BLE001 -- an implementation that cannot run is a result
            row = {"attention": impl, "error": repr(error)[:500]}
        print(row, flush=True)
        rows.append(row)
    base = next((r for r in rows if r["attention"] == "cudnn" and "tokens_per_s" in r), None)
    for row in rows:
        if base and "tokens_per_s" in row:
            row["vs_cudnn"] = row["tokens_per_s"] / base["tokens_per_s"]
            print(f"{row['attention']}: {row['tokens_per_s']:.0f} tokens/s, {row['vs_cudnn']:.3f}x cuDNN")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps(
        {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": args.preset,
         "batch": args.batch, "seq_len": args.seq_len, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
