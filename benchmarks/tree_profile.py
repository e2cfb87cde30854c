"""GPU time of every kernel one tree-attention call launches, from a profiler trace.

The benchmark's device time per call (`tree_attention.py`) includes the gaps between launches; this
script shows what the call is made of: the attention kernel, the mask packing (dynamic masks only)
and the split merge. It traces 20 calls with `jax.profiler` (CUPTI) at the two target shapes (B=1 and 8,
prefix 8192, N=64)
and prints the median duration per kernel name.

    PYTHONPATH=. python3 benchmarks/tree_profile.py [--trace-dir /tmp/tree_profile]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.tree_attention import Case, make_inputs
from pallas_kernels import tree_attention
from pallas_kernels.testing import random_tree

CALLS = 20


def kernel_durations(trace_dir: pathlib.Path) -> dict[str, list[float]]:
    """Kernel name -> durations (us) of the GPU events in the perfetto trace under trace_dir."""
    trace_file = next(trace_dir.rglob("*.trace.json.gz"))
    events = json.load(gzip.open(trace_file))["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    durations = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "gpu" in processes.get(e.get("pid"), "").lower():
            durations[e["name"][:80]].append(e["dur"])
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace-dir", type=pathlib.Path, default=pathlib.Path("/tmp/tree_profile"))
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    for case in (Case(1, 8192, 64), Case(8, 8192, 64)):
        q, caches, lengths, mask = make_inputs(case, jnp.bfloat16, copies=2)
        static_mask = np.asarray(random_tree(0, case.nodes))
        calls = {"dynamic mask": jax.jit(lambda q, k, v, lengths, mask: tree_attention(q, k, v, lengths, mask)),
                 "static mask": jax.jit(lambda q, k, v, lengths, mask: tree_attention(q, k, v, lengths, static_mask))}
        for label, call in calls.items():
            for _ in range(3):
                jax.block_until_ready(call(q, *caches[0], lengths, mask))
            trace_dir = args.trace_dir / f"B{case.batch}_{label.replace(' ', '_')}"
            with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                for i in range(CALLS):
                    result = call(q, *caches[i % len(caches)], lengths, mask)
                jax.block_until_ready(result)
            print(f"{case.label}, {label}:")
            for name, durations in sorted(kernel_durations(trace_dir).items(), key=lambda kv: -sum(kv[1])):
                print(f"  {len(durations):4d} x {np.median(durations):8.2f} us  {name}")


if __name__ == "__main__":
    main()
