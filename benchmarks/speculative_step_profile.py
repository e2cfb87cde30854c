"""Where a speculative step's time goes: in-loop pass times and a kernel census of one generate call.

Random bf16 weights (speed does not depend on them): the ~1.1B target, batch-invariant at
--invariant-rows, and the ~21M draft, a chain tree. It prints
  * one target decode step inside `generate_incremental`, per token;
  * one speculative step (draft passes + verify + accept), per target call;
  * one draft / target tree pass over the chain's nodes inside a `fori_loop` (what a pass costs
    in the loop, without the dispatch a single jitted call pays);
  * GPU kernels per step by name (count and microseconds), from a `jax.profiler` trace.

    PYTHONPATH=. python3 benchmarks/speculative_step_profile.py [--depth 6] [--out /tmp/step_profile.json]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fa2jax import Transformer, TransformerConfig
from pallas_kernels.testing import median_time
from spec import ExpansionTree, SpeculativeDecoder, generate_incremental


def bf16_model(config: TransformerConfig, seed: int) -> Transformer:
    """A random model whose parameters are stored in bf16, as the benchmarks load checkpoints."""
    graphdef, params, rest = nnx.split(Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), rest)


def pass_in_loop_seconds(model: Transformer, num_nodes: int, context: int, passes: int) -> float:
    """Seconds of one `score_tree` over a chain of num_nodes, run `passes` times in a fori_loop."""
    graphdef, params = nnx.split(model)
    cache = model.init_cache(1, context + num_nodes + 8).replace(lengths=jnp.array([context], jnp.int32))
    mask = np.tril(np.ones((num_nodes, num_nodes), bool))
    tokens = jnp.ones((1, num_nodes), jnp.int32)

    @jax.jit
    def run(params, cache):
        def body(i, c):
            logits, written = nnx.merge(graphdef, params).score_tree(tokens + i, mask, c)
            # The logits feed the carry, so no pass is dead code; the length never changes.
            return written.replace(lengths=c.lengths + (logits[0, 0, 0] > 1e30).astype(jnp.int32))
        return jax.lax.fori_loop(0, passes, body, cache).lengths

    return median_time(lambda: run(params, cache), 5) / passes


def kernel_census(decoder: SpeculativeDecoder, prompt, lengths, new_tokens: int) -> tuple[str, int]:
    """Per-step GPU kernel table of one traced generate call, and the number of target calls."""
    jax.block_until_ready(decoder.generate(prompt, lengths, max_new_tokens=new_tokens).tokens)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            result = decoder.generate(prompt, lengths, max_new_tokens=new_tokens)
            jax.block_until_ready(result.tokens)
        trace_file = next(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
        events = json.load(gzip.open(trace_file))["traceEvents"]
    calls = int(result.stats.target_calls)
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    kernels = [e for e in events if e.get("ph") == "X" and "gpu" in processes.get(e.get("pid"), "").lower()]
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e["name"][:90]][0] += 1
        by_name[e["name"][:90]][1] += e["dur"]
    lines = [f"{calls} target calls; {len(kernels) / calls:.0f} kernels and "
             f"{sum(e['dur'] for e in kernels) / calls:.0f} us of kernel time per call (profiler on)"]
    for name, (count, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]:
        lines.append(f"{count / calls:7.1f}/call {us / calls:9.1f} us/call  {name}")
    return "\n".join(lines), calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=6, help="chain depth")
    parser.add_argument("--invariant-rows", type=int, default=9)
    parser.add_argument("--draft-layers", type=int, default=None, help="default: the draft_20m preset's")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default="/tmp/speculative_step_profile.json")
    parser.add_argument("--smoke", action="store_true", help="2-layer toy shapes: a CPU check of the script")
    args = parser.parse_args()
    toy = dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128) if args.smoke else {}
    layers = {"num_layers": args.draft_layers} if args.draft_layers else {}
    target = bf16_model(TransformerConfig.target_1b(invariant_rows=args.invariant_rows, **toy), 0)
    draft = bf16_model(TransformerConfig.draft_20m(**{**toy, **layers}), 1)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 32000, (1, 128)), jnp.int32)
    lengths = jnp.array([128], jnp.int32)
    decoder = SpeculativeDecoder(target, draft, tree=ExpansionTree.chain(args.depth))
    census, calls = kernel_census(decoder, prompt, lengths, args.new_tokens)
    nodes = args.depth + 1
    record = dict(
        device=jax.devices()[0].device_kind, jax=jax.__version__, args=vars(args),
        incremental_ms_per_token=1e3 * median_time(
            lambda: generate_incremental(target, prompt, lengths, max_new_tokens=args.new_tokens).tokens, 3)
        / args.new_tokens,
        speculative_ms_per_call=1e3 * median_time(
            lambda: decoder.generate(prompt, lengths, max_new_tokens=args.new_tokens).tokens, 3) / calls,
        draft_pass_in_loop_ms=1e3 * pass_in_loop_seconds(draft, nodes, 200, 100),
        target_pass_in_loop_ms=1e3 * pass_in_loop_seconds(target, nodes, 200, 20),
        census=census)
    print(json.dumps({k: v for k, v in record.items() if k != "census"}, indent=1))
    print(census)
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
