"""Autotunes the Hopper kernels' configs on issue 17's grid and writes them as tuning-cache entries.

    PYTHONPATH=. python3 benchmarks/tune_mosaic.py --out $OUT/tuning_h100.json --head-dims 64 --deadline 540
    PYTHONPATH=. python3 benchmarks/tune_mosaic.py --out $OUT/tuning_h100.json --head-dims 128 --deadline 540

The grid: 16k tokens per batch (B * S), bf16, causal and not; D=64 at 2x8192x16 and 4x4096x32,
D=128 at 2x8192x16 and 1x16384x16. The shapes of one head dim and mask share a cache key (the key has
no shape), so `tuning.autotune_mosaic` tunes them together: every candidate must match the default
config's outputs on each shape, and the winner has the best geometric mean of its time over the
default's. Forward candidates are timed alone, then backward candidates behind the winning forward.

--out collects entries (device kind in the key, jax version and timings in each entry's "measured"
section); a second run adds to it. Each run also appends a note to the file's "_runs" list (what ran,
what --deadline skipped); `merge` leaves those notes behind. Once a cell is past the deadline, no
further candidate starts (one that could not finish at the pace of the slowest so far is skipped), so
a cell may be tuned over part of its candidates: its entry's "measured" counts them. Then, on any
machine:

    PYTHONPATH=. python3 benchmarks/tune_mosaic.py --merge $OUT/tuning_h100.json \
        --into pallas_kernels/fa2/tuning_cache.json
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels.common.device import device_kind
from pallas_kernels.fa2 import block_sizes, tuning
from pallas_kernels.testing import attention_inputs

# head dim -> the (B, S, H) shapes of issue 17's grid at that head dim (B * S = 16k tokens)
SHAPES = {64: [(2, 8192, 16), (4, 4096, 32)], 128: [(2, 8192, 16), (1, 16384, 16)]}


def tune_cell(head_dim: int, causal: bool, args, deadline: float) -> dict:
    """Tunes one cache key; returns what the run note records of it."""
    inputs = [attention_inputs(seed, B, S, S, H, H, head_dim, jnp.bfloat16)[:3]
              for seed, (B, S, H) in enumerate(SHAPES[head_dim])]
    t0 = time.monotonic()
    fwd, bwd = tuning.autotune_mosaic(
        inputs, causal=causal, include_backward=not args.forward_only, deterministic=not args.nondeterministic,
        repeats=args.repeats, path=pathlib.Path(args.out), deadline=deadline)
    key = block_sizes.cache_key(device_kind(), jnp.bfloat16, head_dim, ("causal",) if causal else ())
    measured = json.loads(pathlib.Path(args.out).read_text())[key][block_sizes.MEASURED]
    return {"key": key, "seconds": round(time.monotonic() - t0, 1), "mosaic_fwd": str(fwd),
            "mosaic_bwd": str(bwd), "measured": measured}


def merge(source: str, target: str) -> None:
    keys = block_sizes.merge_caches(pathlib.Path(source), pathlib.Path(target))
    print(f"merged {len(keys)} entries of {source} into {target}:", *keys, sep="\n  ", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the cache file to write (entries are added to an existing one)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], choices=sorted(SHAPES))
    parser.add_argument("--masks", nargs="+", default=["plain", "causal"], choices=["plain", "causal"])
    parser.add_argument("--deadline", type=float, default=540.0,
                        help="seconds from start after which no further candidate starts")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per candidate and shape")
    parser.add_argument("--forward-only", action="store_true", help="tune the forward only")
    parser.add_argument("--nondeterministic", action="store_true",
                        help="tune the reduce-add backward (deterministic=False) instead of the default one")
    parser.add_argument("--merge", metavar="SOURCE", help="merge this cache file into --into, then exit")
    parser.add_argument("--into", metavar="TARGET", help="the cache file --merge writes into")
    args = parser.parse_args()
    if args.merge:
        if not args.into:
            parser.error("--merge needs --into")
        merge(args.merge, args.into)
        return
    if not args.out:
        parser.error("--out is required (or --merge SOURCE --into TARGET)")
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger(tuning.__name__).setLevel(logging.INFO)  # one line per candidate and shape

    start = time.monotonic()
    deadline = start + args.deadline
    out = pathlib.Path(args.out)
    note = {"device_kind": device_kind(), "jax_version": jax.__version__, "argv": sys.argv[1:],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "deadline_s": args.deadline, "cells": [], "skipped": []}
    print(json.dumps({k: note[k] for k in ("device_kind", "jax_version", "argv")}), flush=True)

    def write_note():
        cache = json.loads(out.read_text()) if out.exists() else {}
        runs = cache.setdefault("_runs", [])
        note["elapsed_s"] = round(time.monotonic() - start, 1)
        if runs and runs[-1].get("started") == note["started"]:  # this run's note, written before
            runs[-1] = note
        else:
            runs.append(note)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")

    for head_dim in args.head_dims:
        for mask in args.masks:
            cell = f"D={head_dim} {mask} {SHAPES[head_dim]}"
            if time.monotonic() > deadline:
                note["skipped"].append(cell)
                print(f"skipped (past --deadline {args.deadline:.0f} s): {cell}", flush=True)
                continue
            print(f"tuning {cell}", flush=True)
            try:
                result = tune_cell(head_dim, mask == "causal", args, deadline)
            except ValueError as error:  # the default did not run (deadline, or it is broken here)
                note["skipped"].append(f"{cell}: {error}")
                print(f"skipped {cell}: {error}", flush=True)
            else:
                note["cells"].append(result)
                if result["mosaic_bwd"] == "None" and not args.forward_only:
                    note["skipped"].append(f"{cell}: the backward (its default did not start before the deadline)")
                print(json.dumps(result), flush=True)
            write_note()
    write_note()
    print(f"done in {time.monotonic() - start:.0f} s; {len(note['cells'])} cells tuned into {out}; "
          f"skipped {len(note['skipped'])}:", *note["skipped"], sep="\n  ", flush=True)


if __name__ == "__main__":
    main()
