"""Where the time goes inside the Hopper tree kernel: Mosaic GPU's in-kernel profiler, per warpgroup.

`tree_profile.py` times whole kernels; this script times the phases inside one. It wraps the
phases of the shared K/V pipeline (`Pipeline.produce`, `wait_queries`, `consume`, each `_step` and
`store`) in named scopes for the length of this process, and compiles the kernel with Mosaic GPU's
profiler on (`CompilerParams.profile_space`/`profile_dir`), which records a timestamp per scope
entry and exit in every warpgroup. It then prints, per case, the spread of the CTAs' start times,
the median / p90 / max duration of each phase, and the whole timeline of the warpgroup that ends
last (the kernel's critical path).

    JAX_PLATFORMS=cuda,cpu PYTHONPATH=. python3 benchmarks/tree_timeline.py [--out DIR]

The profiler writes its trace through a host callback, hence `cpu` among the platforms. Durations
inside a warpgroup are clock cycles, converted at the SM clock given by --clock-ghz (1.755 GHz:
an H100 SXM under load); CTA start offsets come from the global timer. The profiler's own
bookkeeping adds a little to each phase. Outputs from an H100, each from the kernel of its day:
`results/tree_kernel_timeline_session12.txt` and `results/tree_kernel_timeline_session13.txt`.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.tree_attention import Case, make_inputs
from pallas_kernels.common import mosaic_pipeline
from pallas_kernels.testing import random_tree
from pallas_kernels.tree import mosaic_kernel

PHASES = {"produce": "produce", "wait_queries": "q_wait", "consume": "consume", "_step": "step", "store": "store"}


def instrument(profile_dir: dict) -> None:
    """Named scopes around the pipeline's phases, and the profiler on, for this process; kernels
    traced afterwards write their traces to profile_dir["path"] as it is at trace time."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def scoped(name, method):
        def wrapper(*args, **kwargs):
            with jax.named_scope(name):
                return method(*args, **kwargs)
        return wrapper

    for method, name in PHASES.items():
        setattr(mosaic_pipeline.Pipeline, method, scoped(name, getattr(mosaic_pipeline.Pipeline, method)))
    kernel_options = mosaic_pipeline.Pipeline.kernel_options

    def profiled_options(self):
        options = kernel_options(self)
        # The event buffer lives in shared memory beside the K/V stages: 16 bytes per scope and
        # warpgroup. A split kernel has three 128-key stages and room for about 40 scopes (it runs
        # about 12 in each warpgroup); an unsplit one has two stages and room for its ~70.
        space = 36 if self.stages > 2 else 400
        options["compiler_params"] = options["compiler_params"].replace(profile_space=space,
                                                                        profile_dir=str(profile_dir["path"]))
        return options

    mosaic_pipeline.Pipeline.kernel_options = profiled_options


def summarize(trace_file: pathlib.Path, clock_ghz: float) -> str:
    events = json.loads(trace_file.read_text())["traceEvents"]
    by_warpgroup = collections.defaultdict(list)
    for event in events:
        by_warpgroup[event["tid"]].append(event)
    t0 = min(event["ts"] for event in events)
    starts = [trace[0]["ts"] - t0 for trace in by_warpgroup.values()]
    phases = collections.defaultdict(list)
    for trace in by_warpgroup.values():
        open_scopes = []
        for event in trace:
            if event["ph"] == "B":
                open_scopes.append(event)
            elif open_scopes:
                begin = open_scopes.pop()
                phases[begin["name"]].append((event["ts"] - begin["ts"]) / clock_ghz)
    lines = [f"  {len(by_warpgroup)} warpgroups; CTA start offsets (us): median {np.median(starts):.2f}, "
             f"max {max(starts):.2f}"]
    for name, durations in sorted(phases.items()):
        lines.append(f"  {name:8s} n={len(durations):5d}  median {np.median(durations):7.3f} us  "
                     f"p90 {np.percentile(durations, 90):7.3f}  max {max(durations):7.3f}")
    last = max(by_warpgroup.values(), key=lambda trace: trace[-1]["ts"])
    lines.append("  warpgroup that ends last (us from its first event): " + " ".join(
        f"{event['ph']}{event['name']}@{(event['ts'] - last[0]['ts']) / clock_ghz:.2f}" for event in last))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/tree_timeline"))
    parser.add_argument("--clock-ghz", type=float, default=1.755)
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    words = mosaic_kernel.node_words(random_tree(0, 64))
    current = {}
    instrument(current)
    for batch in (1, 8):  # the two target shapes: N=64, H=32, K=8, D=128, prefix 8192
        profile_dir = current["path"] = args.out / f"B{batch}"
        shutil.rmtree(profile_dir, ignore_errors=True)
        profile_dir.mkdir(parents=True)
        q, ((k, v),), lengths, _ = make_inputs(Case(batch, 8192, 64), jnp.bfloat16)
        splits = mosaic_kernel.num_splits_for(batch=batch, num_kv_heads=8, group_size=4, num_nodes=64,
                                              cache_size=8192 + 64, block_kv=128)
        call = jax.jit(lambda q, k, v, lengths: mosaic_kernel.tree_attention_mosaic(
            q, k, v, lengths, words, sm_scale=128 ** -0.5, num_splits=splits,
            config=mosaic_kernel.MosaicTreeConfig.for_splits(splits)))
        for _ in range(2):  # the second call runs warm; its trace is the newest file
            jax.block_until_ready(call(q, k, v, lengths))
        trace = max(profile_dir.glob("*.json"), key=lambda path: path.stat().st_mtime)
        print(f"B={batch}, prefix 8192, N=64, {splits} split(s):\n{summarize(trace, args.clock_ghz)}", flush=True)


if __name__ == "__main__":
    main()
