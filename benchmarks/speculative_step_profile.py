"""Where a speculative step's time goes, inside the compiled loop: SmolLM2-135M's shape with a feature head.

Random bf16 weights of SmolLM2-135M-Instruct's shape (speed does not depend on them) and a random
feature head for it (`spec.FeatureDrafter`). For each case it prints milliseconds per loop step,
each from the difference of two runs of the loop's compiled `run` with a traced step limit (one
compile; prefill and host overhead cancel):
  * `incremental`: one decode step of `generate_incremental` (greedy, or sampled: incremental/t1.0);
  * `<tree>/<mode>`: one speculative step (draft passes + tree pass + verify + commit);
  * with `--pieces`, the step's parts in a `fori_loop` of their own: the draft (all head passes
    and tree building) and the target's tree pass (`score_tree` with hidden states), so
    verify + commit = step - draft - tree pass;
  * GPU kernels per step (count and microseconds by kernel name) and device-to-host copies per
    step (each one a host round trip: `while` conditions, `cond` predicates), from a
    `jax.profiler` trace of one run.

XLA flags differ between processes (XLA reads them once): run the script once per flag set, e.g.
with and without `--xla_gpu_enable_command_buffer=...,WHILE,CONDITIONAL` (`gpu_session.sh profile`).

    PYTHONPATH=. python3 benchmarks/speculative_step_profile.py --pieces \\
        --cases incremental/greedy,dynamic32/greedy,dynamic128/t1.0 --out /tmp/step_profile.json
    JAX_PLATFORMS=cpu PYTHONPATH=. python3 benchmarks/speculative_step_profile.py --smoke   # a CPU check
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fa2jax import Transformer, TransformerConfig
from fa2jax.feature_head import FeatureHead, FeatureHeadConfig
from pallas_kernels.testing import median_time
from spec import DynamicTree, SpeculativeDecoder, incremental
from spec.feature_draft import FeatureDrafter
from spec.generation import EOS_SLOTS

TREES = {
    "dynamic16": DynamicTree(num_nodes=16, depth=6, top_k=4),
    "dynamic32": DynamicTree(num_nodes=32, depth=7, top_k=6),
    "dynamic64": DynamicTree(num_nodes=64, depth=5, top_k=12),
    "dynamic128": DynamicTree(num_nodes=128, depth=6, top_k=12),
}
MODES = {"greedy": 0.0, "t0.7": 0.7, "t1.0": 1.0}


def smollm2_shape(smoke: bool) -> TransformerConfig:
    """SmolLM2-135M-Instruct's shape in bf16 (the GGUF's config); --smoke: 2 small layers."""
    if smoke:
        return TransformerConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                 d_ff=128, max_len=1024, tie_embeddings=True, dtype=jnp.bfloat16,
                                 param_dtype=jnp.bfloat16)
    return TransformerConfig(vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                             d_ff=1536, rope_theta=100000.0, norm_eps=1e-5, max_len=8192, tie_embeddings=True,
                             dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def warp_of(temperature: float) -> dict:
    """The loops' warp scalars: top-p 0.95 when sampling, as speculative_real.py's modes."""
    return dict(temperature=jnp.float32(temperature), top_p=jnp.float32(0.95 if temperature > 0 else 1.0),
                top_k=jnp.int32(0), min_p=jnp.float32(0.0))


def per_step_ms(run, state0, first: int, second: int, iters: int) -> float:
    """ms of one loop step: run(state, step_limit) for `second` and `first` steps, differenced."""
    calls0 = int(state0.target_calls)
    times = {}
    for steps in (first, second):
        limit = jnp.int32(calls0 + steps)
        times[steps] = median_time(lambda: run(state0, limit).target_calls, iters)
    return 1e3 * (times[second] - times[first]) / (second - first)


def trace_census(run, state0, steps: int) -> dict:
    """Kernels and device-to-host copies per step of a traced run of `steps` steps."""
    limit = jnp.int32(int(state0.target_calls) + steps)
    jax.block_until_ready(run(state0, limit))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(run(state0, limit))
        found = list(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
        if not found:
            return {"error": "no trace file"}
        events = json.load(gzip.open(found[0]))["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = [e for e in events if e.get("ph") == "X" and "/device:gpu" in processes.get(e.get("pid"), "").lower()]
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in device:
        by_name[e["name"][:80]][0] += 1
        by_name[e["name"][:80]][1] += e["dur"]
    copies = sum(c for n, (c, _) in by_name.items() if "memcpy" in n.lower() and "dtoh" in n.lower().replace(" ", ""))
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:30]
    return dict(events_per_step=len(device) / steps, device_us_per_step=sum(e["dur"] for e in device) / steps,
                d2h_copies_per_step=copies / steps,
                top=[dict(name=n, per_step=c / steps, us_per_step=us / steps) for n, (c, us) in top])


def in_loop_ms(body, carry, passes: int, iters: int) -> float:
    """ms of one `body(carry) -> carry` inside a fori_loop of `passes`."""
    run = jax.jit(lambda c: jax.lax.fori_loop(0, passes, lambda i, c: body(c), c))
    return 1e3 * median_time(lambda: run(carry), iters) / passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="incremental/greedy,dynamic32/greedy,dynamic128/t1.0,dynamic128/greedy,"
                                            "incremental/t1.0,dynamic32/t1.0",
                        help=f"comma list of <tree>/<mode>, run in this order: tree incremental or one of "
                             f"{sorted(TREES)}, mode one of {sorted(MODES)} (t: top-p 0.95)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", default="8,40", help="the two step counts whose difference is timed")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per figure (median)")
    parser.add_argument("--pieces", action="store_true", help="also time the draft and the tree pass alone")
    parser.add_argument("--no-trace", action="store_true", help="skip the profiler census")
    parser.add_argument("--variant", default=os.environ.get("XLA_FLAGS", "") or "default",
                        help="a label for this process's XLA flags (default: $XLA_FLAGS)")
    parser.add_argument("--deadline", type=float, default=0, help="minutes; stop starting cases after it (0: none)")
    parser.add_argument("--out", default="/tmp/speculative_step_profile.json")
    parser.add_argument("--smoke", action="store_true", help="2-layer toy shapes: a CPU check of the script")
    args = parser.parse_args()
    cases = [tuple(c.split("/")) for c in args.cases.split(",") if c]
    for case in cases:
        if len(case) != 2 or case[0] not in (*TREES, "incremental") or case[1] not in MODES:
            parser.error(f"bad case {'/'.join(case)!r}: <tree>/<mode> with tree incremental or one of {sorted(TREES)} "
                         f"and mode one of {sorted(MODES)}")
    first, second = (int(s) for s in args.steps.split(","))
    if not 0 < first < second:
        parser.error(f"--steps needs 0 < first < second, got {args.steps!r}")
    start = time.monotonic()
    out_of_time = lambda: args.deadline > 0 and time.monotonic() - start > 60 * args.deadline

    config = smollm2_shape(args.smoke)
    target = Transformer(config, rngs=nnx.Rngs(0))
    head = FeatureHead(FeatureHeadConfig.for_target(config), rngs=nnx.Rngs(1))
    drafter = FeatureDrafter(head, target)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.prompt_len)), jnp.int32)
    lengths = jnp.full((args.batch,), args.prompt_len, jnp.int32)
    # Room for `second` steps of the deepest tree, so no row reaches its limit inside the timed runs.
    max_new = (max([TREES[t].depth for t, _ in cases if t in TREES] + [0]) + 1) * second + 8
    no_eos = jnp.full((EOS_SLOTS,), -1, jnp.int32)
    record = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, variant=args.variant, args=vars(args),
                  cases={})

    def save():
        pathlib.Path(args.out).write_text(json.dumps(record, indent=1))

    def report(name, **fields):
        record["cases"][name] = fields
        print(name, json.dumps({k: v for k, v in fields.items() if k != "census"}), flush=True)
        if "census" in fields and "top" in fields["census"]:
            for row in fields["census"]["top"][:12]:
                print(f"    {row['per_step']:6.1f}/step {row['us_per_step']:8.1f} us/step  {row['name']}")
        save()

    graphdef, params = nnx.split(target)
    for tree_name, mode in cases:
        if out_of_time():
            break
        temperature = MODES[mode]
        warp = warp_of(temperature)
        if tree_name == "incremental":
            state0 = incremental._init_jit(graphdef, params, prompt, lengths, jax.random.key(0), no_eos, warp,
                                           max_new_tokens=max_new, fused=True)
            run = lambda s, limit: incremental._run_jit(graphdef, params, s, no_eos, warp, limit, fused=True,
                                                        sampling=temperature > 0)
            fields = dict(ms_per_step=per_step_ms(run, state0, first, second, args.iters))
            if not args.no_trace:
                fields["census"] = trace_census(run, state0, second)
            report(f"incremental/{mode}", **fields)
            continue
        decoder = SpeculativeDecoder(target, drafter, tree=TREES[tree_name],
                                     verify="greedy" if temperature == 0 else "stochastic")
        tp, dp = decoder._target_params, decoder._draft_params
        state0 = decoder._init_jit(tp, dp, prompt, lengths, warp["temperature"], warp["top_p"], jax.random.key(0),
                                   no_eos, max_new_tokens=max_new, top_k=warp["top_k"], min_p=warp["min_p"])
        # Its own jit of the loop: the decoder's takes over (donates) the state it is given, and the
        # timings run it from state0 again and again.
        run_jit = jax.jit(decoder.run)
        run = lambda s, limit: run_jit(tp, dp, s, warp["temperature"], warp["top_p"], no_eos, limit,
                                       warp["top_k"], warp["min_p"])
        fields = dict(ms_per_step=per_step_ms(run, state0, first, second, args.iters))
        if args.pieces:
            def draft_body(carry):
                caches, root, key = carry
                key, sub = jax.random.split(key)
                tree, caches = decoder.draft(dp, caches, root, sub, warp["temperature"], warp["top_p"],
                                             warp["top_k"], warp["min_p"])
                return caches, (root + tree.tokens[:, -1]) % config.vocab_size, key
            fields["draft_ms"] = in_loop_ms(draft_body, (state0.draft_caches, state0.root, jax.random.key(1)),
                                            20, args.iters)
            tree, _ = jax.jit(lambda c, r: decoder.draft(dp, c, r, jax.random.key(2), warp["temperature"],
                                                         warp["top_p"], warp["top_k"], warp["min_p"]))(
                state0.draft_caches, state0.root)

            def score_body(cache):
                logits, written, hidden = decoder.score(tp, cache, tree, return_hidden=True)
                # The outputs feed the carry, so no part of the pass is dead code; lengths never change.
                alive = (logits[0, 0, 0] > 1e30) | (hidden[0, 0, 0] > 1e30)
                return written.replace(lengths=cache.lengths + alive.astype(jnp.int32))
            fields["tree_pass_ms"] = in_loop_ms(score_body, state0.target_cache, 20, args.iters)
            fields["verify_commit_ms"] = fields["ms_per_step"] - fields["draft_ms"] - fields["tree_pass_ms"]
        if not args.no_trace:
            fields["census"] = trace_census(run, state0, second)
        report(f"{tree_name}/{mode}", **fields)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
