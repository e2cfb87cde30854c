"""The cost of one decoding step of the speculative target (SmolLM2-135M's shape): time and kernels.

At batch 1 a step of a 135M model is bound by the number of kernels it launches (30 layers of a
dozen-plus small kernels), not by its weights' bytes. For each batch size this reports, with the
projections separate (as loaded) and fused (`fa2jax.fuse_projections`):
  * ms per token of `spec.generate_incremental` (one compiled while loop), from the difference of
    a max_new_tokens=N and a max_new_tokens=1 call, so prefill and host overhead cancel;
  * ms of one tree verification (`score_tree`) of 8/32/64 nodes (a binary tree) inside a
    `fori_loop`, as the speculative loop runs it (no per-call dispatch);
  * kernels per step, counted in the compiled executables (`fa2jax.kernel_census`: on a GPU the
    thunks, about the kernel launches): the decode step (model.decode of one token + argmax), a
    16-token extend (chunked prefill), the prefill, and one verify pass.
Each XLA flag set (--variants) runs in a child process of its own (XLA reads its flags once per
process); a flag this XLA does not know fails that variant alone.

Random bf16 weights of SmolLM2-135M's shape (speed does not depend on them), or --target PATH for
real ones (anything `fa2jax.load_pretrained` opens, e.g. the SmolLM2 GGUF).

    PYTHONPATH=. python benchmarks/decode_step.py --out benchmarks/results/decode_step \\
        --variants default,command_buffer
    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/decode_step.py --layers 2 --batches 1 --nodes 8 \\
        --new-tokens 8 --out /tmp/decode_step          # a CPU check of the script

Writes OUT.json (every number and each census by opcode) and OUT.md (the tables).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fa2jax import Transformer, TransformerConfig, fuse_projections, load_pretrained
from fa2jax.kernel_census import KernelCensus, kernel_census
from fa2jax.model import replace_config
from pallas_kernels.testing import ancestor_mask, median_time
from spec import generate_incremental, incremental
from spec.generation import check_generate_args

# XLA flag sets to compare; each runs in a process of its own. Command buffers put a step's
# kernels into CUDA graphs (WHILE/CONDITIONAL: the loop itself too), launched as one.
VARIANTS = {
    "default": "",
    "command_buffer": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
    "command_buffer_min1": ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,"
                            "CONDITIONAL --xla_gpu_graph_min_graph_size=1"),
    "unroll2": "--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_DOUBLE_BUFFER",
}
CENSUS_FIELDS = ("total", "matmuls", "custom_calls", "copies", "graph_launches")
TOP_KINDS = 25  # rows of the by-kind table


def smollm2_135m(num_layers: int = 30) -> TransformerConfig:
    """SmolLM2-135M-Instruct's shape in bf16 (the GGUF's config), with `num_layers` layers."""
    return TransformerConfig(vocab_size=49152, d_model=576, num_layers=num_layers, num_heads=9, num_kv_heads=3,
                             head_dim=64, d_ff=1536, rope_theta=100000.0, norm_eps=1e-5, max_len=8192,
                             tie_embeddings=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def build_model(args) -> Transformer:
    if args.target:
        model = load_pretrained(args.target, dtype=jnp.bfloat16)
    else:
        model = Transformer(smollm2_135m(args.layers), rngs=nnx.Rngs(0))
    if args.attention_impl != "auto":
        model = replace_config(model, attention_impl=args.attention_impl)
    return model


def heap_tree(num_nodes: int) -> np.ndarray:
    """bool [N, N] ancestor mask of a binary tree in heap order (node i's parent is (i - 1) // 2)."""
    return ancestor_mask([(i - 1) // 2 for i in range(num_nodes)])


def compiled(fn, *args, donate_argnums=()):
    """fn jitted and compiled for args: (the executable, its optimized HLO text)."""
    executable = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    return executable, executable.as_text()


def incremental_ms_per_token(model, batch: int, prompt_len: int, new_tokens: int, fused: bool, iters: int) -> float:
    """ms per token of generate_incremental: (time of N tokens - time of 1) / (N - 1)."""
    rng = np.random.default_rng(batch)
    prompt = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)

    def seconds(n):
        return median_time(lambda: generate_incremental(model, prompt, lengths, max_new_tokens=n, fused=fused).tokens,
                           iters)

    return 1e3 * (seconds(new_tokens) - seconds(1)) / (new_tokens - 1)


def verify_in_loop(model, batch: int, num_nodes: int, context: int, capacity: int, passes: int, iters: int):
    """(ms of one score_tree pass of a num_nodes binary tree inside a fori_loop, the census of one pass)."""
    graphdef, params = nnx.split(model)
    cache = model.init_cache(batch, capacity).replace(lengths=jnp.full((batch,), context, jnp.int32))
    mask = heap_tree(num_nodes)
    tokens = jnp.ones((batch, num_nodes), jnp.int32)

    def run(params, cache):
        def body(i, c):
            logits, written = nnx.merge(graphdef, params).score_tree(tokens + i, mask, c)
            # The logits feed the carry, so no pass is dead code; the lengths never change.
            return written.replace(lengths=c.lengths + (logits[0, 0, 0] > 1e30).astype(jnp.int32))
        return jax.lax.fori_loop(0, passes, body, cache).lengths

    executable, text = compiled(run, params, cache)
    ms = 1e3 * median_time(lambda: executable(params, cache), iters) / passes
    return ms, kernel_census(text, scope="loop")


def step_censuses(model, batch: int, prompt_len: int, new_tokens: int, capacity: int,
                  fused: bool) -> dict[str, KernelCensus]:
    """Kernel census of one iteration of generate_incremental's loop, and of the cached calls
    compiled alone (the cache donated, as a loop updates it in place): decode step, 16-token
    extend, prefill."""
    graphdef, params = nnx.split(model)
    cache = model.init_cache(batch, capacity).replace(lengths=jnp.full((batch,), prompt_len, jnp.int32))

    def decode_step(params, cache, tokens):  # one token in, the greedy next token out
        logits, cache = nnx.merge(graphdef, params).decode(tokens, cache)
        return jnp.argmax(logits[:, -1], axis=-1), cache

    def prefill(params, cache, tokens):
        return nnx.merge(graphdef, params).prefill(tokens, jnp.full((batch,), prompt_len, jnp.int32), cache)

    calls = {"decode step": (decode_step, jnp.ones((batch, 1), jnp.int32)),
             "extend 16": (decode_step, jnp.ones((batch, 16), jnp.int32)),
             f"prefill {prompt_len}": (prefill, jnp.ones((batch, prompt_len), jnp.int32))}
    censuses = {"incremental loop": kernel_census(
        incremental_program(model, batch, prompt_len, new_tokens, fused), scope="loop")}
    for name, (fn, tokens) in calls.items():
        censuses[name] = kernel_census(compiled(fn, params, cache, tokens, donate_argnums=1)[1])
    return censuses


def incremental_program(model, batch: int, prompt_len: int, new_tokens: int, fused: bool) -> str:
    """The optimized HLO of the program generate_incremental runs for these shapes (greedy)."""
    prompt = jnp.zeros((batch, prompt_len), jnp.int32)
    args = check_generate_args(prompt, jnp.full((batch,), prompt_len, jnp.int32), vocab_size=model.config.vocab_size,
                               max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, rng=None, eos_id=None)
    graphdef, params = nnx.split(model)
    lowered = incremental._generate.lower(graphdef, params, args.prompt, args.prompt_lengths, args.rng,
                                          jnp.asarray(args.eos_ids, jnp.int32), args.warp(),
                                          max_new_tokens=new_tokens, fused=fused)
    return lowered.compile().as_text()


def measure(args) -> dict:
    """Every number of one variant (this process's XLA flags)."""
    base = build_model(args)
    models = {True: fuse_projections(base), False: base}
    context = args.prompt_len + args.new_tokens // 2
    capacity = args.prompt_len + args.new_tokens + max(args.nodes)
    record = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "config": {k: str(v) for k, v in vars(base.config).items()}, "timings": [], "census": []}
    start = time.perf_counter()
    # Timings first, the fused model first: on the H100 each set of censuses compiled for ~130 s (a
    # 30-layer program per call), so a call cut short still brings back the batch-1 decode cost.
    for batch in args.batches:
        for fused, model in models.items():
            progress(f"batch {batch} fused={fused}: generate_incremental timing", start)
            row_start = time.perf_counter()
            row = {"batch": batch, "fused": fused,
                   "incremental_ms_per_token": incremental_ms_per_token(
                       model, batch, args.prompt_len, args.new_tokens, fused, args.iters)}
            for nodes in args.nodes:
                progress(f"batch {batch} fused={fused}: verify {nodes} nodes", start)
                ms, census = verify_in_loop(model, batch, nodes, context, capacity, args.passes, args.iters)
                row[f"verify_{nodes}_ms"] = ms
                record["census"].append({"path": f"verify {nodes} nodes", "batch": batch, "fused": fused,
                                         **census.as_dict()})
            row["seconds"] = time.perf_counter() - row_start
            record["timings"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.census:
        for fused, model in models.items():
            progress(f"censuses (fused={fused}): compiling the incremental loop, decode step, extend, prefill", start)
            for name, census in step_censuses(model, args.batches[0], args.prompt_len, args.new_tokens, capacity,
                                              fused).items():
                record["census"].append({"path": name, "batch": args.batches[0], "fused": fused,
                                         **census.as_dict()})
    return record


def progress(what: str, start: float) -> None:
    """One line on stderr per phase, with the seconds since `start`: the run shows where it is."""
    print(f"[{time.perf_counter() - start:7.1f} s] {what}", file=sys.stderr, flush=True)


def run_variant(name: str, flags: str, argv: list[str]) -> dict:
    """Runs this script's --child mode under XLA_FLAGS += flags; its record, or the error."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), flags) if f)
    command = [sys.executable, __file__, *argv, "--child"]
    print(f"--- variant {name}: XLA_FLAGS={env['XLA_FLAGS']!r}", file=sys.stderr, flush=True)
    # The child's stderr (its progress lines) is echoed as it comes: captured whole and written at
    # the end, a child compiling for minutes looked exactly like a hung one.
    tail = collections.deque(maxlen=60)
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        for line in child.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line)
        stdout = child.stdout.read()
    if child.returncode != 0:
        return {"xla_flags": flags, "error": f"exit {child.returncode}: {''.join(tail)[-2000:]}"}
    return {"xla_flags": flags, **json.loads(stdout.strip().splitlines()[-1])}


def markdown(results: dict, args) -> str:
    """The timing table and the census table of every variant."""
    nodes = args.nodes
    lines = ["| variant | B | projections | incremental ms/token | "
             + " | ".join(f"verify {n} nodes ms" for n in nodes) + " |",
             "|" + " --- |" * (4 + len(nodes))]
    for name, record in results["variants"].items():
        if "error" in record:
            lines.append(f"| {name} | failed: {record['error'].splitlines()[-1][:120]} |")
            continue
        for row in record["timings"]:
            cells = [name, str(row["batch"]), "fused" if row["fused"] else "separate",
                     f"{row['incremental_ms_per_token']:.3f}"] + [f"{row[f'verify_{n}_ms']:.3f}" for n in nodes]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Kernels per step (compiled executable; thunks on a GPU), separate -> fused projections:", "",
              "| variant | path | B | " + " | ".join(CENSUS_FIELDS) + " |", "|" + " --- |" * (3 + len(CENSUS_FIELDS))]
    for name, record in results["variants"].items():
        if "error" in record:
            continue
        pairs = {}
        for entry in record["census"]:
            pairs.setdefault((entry["path"], entry["batch"]), {})[entry["fused"]] = entry
        for (path, batch), pair in pairs.items():
            cells = [f"{pair[False][f]} -> {pair[True][f]}" for f in CENSUS_FIELDS]
            lines.append(f"| {name} | {path} | {batch} | " + " | ".join(cells) + " |")
    for name, record in results["variants"].items():
        loop = {e["fused"]: e["by_name"] for e in record.get("census", ()) if e["path"] == "incremental loop"}
        if len(loop) < 2:
            continue
        kinds = sorted(set(loop[False]) | set(loop[True]), key=lambda k: -max(loop[False].get(k, 0), loop[True].get(k, 0)))
        lines += ["", f"{name}: kernels of one incremental step by kind (separate -> fused):", "",
                  "| kind | separate | fused |", "| --- | --- | --- |"]
        lines += [f"| {k} | {loop[False].get(k, 0)} | {loop[True].get(k, 0)} |" for k in kinds[:TOP_KINDS]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", help="real weights: a GGUF file, a Hugging Face folder or a fa2jax checkpoint")
    p.add_argument("--layers", type=int, default=30, help="layers of the random model (30 = SmolLM2-135M)")
    p.add_argument("--batches", type=ints, default=[1, 4, 16])
    p.add_argument("--nodes", type=ints, default=[8, 32, 64], help="tree sizes of the verify timing")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens of the timed generate call (>= 2)")
    p.add_argument("--passes", type=int, default=20, help="verify passes per timed loop")
    p.add_argument("--iters", type=int, default=5, help="timed samples (the median is reported)")
    p.add_argument("--no-census", dest="census", action="store_false",
                   help="skip the kernel censuses of the decode step, extend and prefill (minutes of compiling)")
    p.add_argument("--attention-impl", choices=("auto", "pallas", "xla", "cudnn"), default="auto")
    p.add_argument("--variants", default="default",
                   help=f"comma-separated XLA flag sets, among {sorted(VARIANTS)}, or name=FLAGS for others")
    p.add_argument("--out", default="/tmp/decode_step", help="writes OUT.json and OUT.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (the time per token is a difference), got {args.new_tokens=}")
    if args.target and args.layers != 30:
        raise ValueError(f"--layers shapes the random model; --target {args.target} brings its own: {args.layers=}")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    variants = {}
    for item in args.variants.split(","):
        name, sep, flags = item.partition("=")
        if not sep and name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}: give one of {sorted(VARIANTS)} or name=FLAGS")
        variants[name] = flags if sep else VARIANTS[name]
    # The parent never starts a backend: the children own the device.
    results = {"args": vars(args), "variants": {name: run_variant(name, flags, argv)
                                                for name, flags in variants.items()}}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(f"{out}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, args)
    pathlib.Path(f"{out}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
