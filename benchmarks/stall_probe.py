"""Where two GPU runs stalled: each suspect call in a child process under a time limit, one table.

Stall 1: `benchmarks/train_step.py --segment-len 512` (target-1b, batch 4, seq 2048, 512-token
documents aligned on the key tiles) with segment ids allowed onto the Hopper kernels printed nothing
for 110 s. Stall 2: `benchmarks/decode_step.py --batches 1 --nodes 8,32 --new-tokens 32` (SmolLM2-135M
shape: 9 query heads, 3 KV heads, 30 layers) printed nothing for 200 s. In Mosaic GPU's CPU simulator
the Hopper FlashAttention kernels do not deadlock with tile-aligned documents (nor with tiles that see
no key at all: tests/test_mosaic_backward.py), and a query-head group of 3 keeps the tree and decode
calls on the portable kernels (the Hopper tree kernel needs an even group), which give the reference's
values in interpret mode at these sizes. So this separates, on the GPU, compile time from run time
for each call those runs make.

The train batch carries segment ids even unpacked (`scale_out._batch`: all 1 with one document per
row), so the unpacked step that took 0.15 s (BENCHMARKS.md, session 16) ran on the portable kernels,
and the stalled run was the first train step through the Hopper kernels at all. With segment ids
allowed onto them, a one-document ("seg2048") and a packed ("seg512") step run the same compiled
kernels and differ only in the ids (the tile ranges visited): the seg2048 cases against the seg512
ones tell a data-dependent hang from a slow compile, and the 2-layer against the 22-layer step a
per-layer cost (every layer's call lowers to the same kernel hash) from a per-kernel one.

Every case runs in a child of its own (a hung kernel cannot be interrupted from Python) and prints
one line per phase as it finishes: lower (trace + lowering), compile (XLA, and the Mosaic kernels
where XLA compiles them), run 1 (where a Mosaic kernel compiled at its first launch shows up) and
run 2 (the steady-state cost). A case past --timeout has its threads' stacks printed by faulthandler
and is killed; the table names the phase it was in.

    PYTHONPATH=. python benchmarks/stall_probe.py                      # every case, ~10 min at most
    PYTHONPATH=. python benchmarks/stall_probe.py --only fa-fwd-seg512,train-seg512-mosaic-2l
    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/stall_probe.py --small   # a CPU check of the script

--small shrinks every shape (and runs the Hopper kernels in the simulator) so that the plumbing can be
checked on a CPU; its times mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import pathlib
import queue
import re
import subprocess
import sys
import threading
import time

# One entry per case, in the order they run: the stalled configuration first (its kernels alone,
# then the train step), the baselines after, then the decode benchmark's calls; a tight --budget
# skips from the end. name -> what it times.
CASES = {
    "fa-fwd-seg512": "Hopper forward, causal, 512-token documents aligned on tiles",
    "fa-fwdbwd-seg512": "Hopper forward + deterministic backward (dK/dV and dQ kernels), aligned documents",
    "fa-fwdbwd-seg2048": "the same kernels with one document per row (ids all 1: the 'unpacked' train batch)",
    "train-seg512-mosaic-2l": "target-1b train step, 2 layers, packed, segment ids on the Hopper kernels",
    "train-seg2048-mosaic-2l": "the same, one document per row: the same kernels as packed, other ids",
    "train-seg512-mosaic": "target-1b train step, 22 layers, packed, segment ids on the Hopper kernels",
    "fa-fwd-plain": "Hopper forward, causal, no segment ids (baseline), target-1b attention shape",
    "fa-fwdbwd-plain": "Hopper forward + deterministic backward, no segment ids (baseline)",
    "fa-fwdbwd-seg512-atomic": "Hopper forward + reduce-add dQ backward (deterministic=False), aligned documents",
    "fa-fwdbwd-segrandom": "Hopper forward + deterministic backward, 6 random documents per row",
    "fa-fwdbwd-seg512-portable": "portable (Triton) forward + backward, aligned documents (today's default)",
    "tree-kernels-9x3": "tree/decode attention kernels as the decode benchmark calls them: 9/3 heads, D=64",
    "decode-step-30l": "SmolLM2-135M shape: one decode step (model.decode of 1 token)",
    "verify-32-30l": "SmolLM2-135M shape: 20 tree verifications of 32 nodes in a fori_loop",
    "incremental-32-30l": "SmolLM2-135M shape: generate_incremental of 32 tokens (first call, second call)",
}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every size the cases use; `small()` for a CPU check of the script."""

    batch: int = 4  # target-1b train rows
    seq: int = 2048
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 64
    doc: int = 512  # tokens per packed document
    train_layers: int = 22
    decode_layers: int = 30
    prompt_len: int = 128  # decode_step's defaults for --new-tokens 32 --nodes 8,32
    new_tokens: int = 32
    interpret: bool = False

    @classmethod
    def small(cls) -> "Shapes":
        return cls(batch=1, seq=512, heads=2, kv_heads=1, doc=128, train_layers=1, decode_layers=2,
                   prompt_len=16, new_tokens=4, interpret=True)

    def __post_init__(self):
        if self.seq % self.doc or self.heads % self.kv_heads:
            raise ValueError(f"documents must tile the rows and KV heads divide the heads: {self}")


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _doc_len(name: str, shapes: Shapes) -> int:
    """Tokens per document of a case: "seg2048" is one document per row (at any --small length)."""
    return shapes.seq if "seg2048" in name else shapes.doc


def _timed_phases(lower, run) -> None:
    """lower() -> a jax Lowered; then compiles it and calls run(compiled) twice, printing each
    phase's seconds as it finishes (so a stall names the phase it is in). run returns a dict of
    extra fields for its line, after blocking on its result."""
    start = time.perf_counter()
    lowered = lower()
    _say(phase="lower", s=round(time.perf_counter() - start, 2))
    start = time.perf_counter()
    compiled = lowered.compile()
    _say(phase="compile", s=round(time.perf_counter() - start, 2))
    for phase in ("run1", "run2"):
        start = time.perf_counter()
        extra = run(compiled)
        _say(phase=phase, s=round(time.perf_counter() - start, 3), **extra)


def _timed_jit(fn, *args, static=None):
    """Lowers, compiles and runs jax.jit(fn) on args twice, timing each phase."""
    import jax

    def run(compiled):
        jax.block_until_ready(compiled(*args))
        return {}

    _timed_phases(lambda: jax.jit(fn, static_argnums=static or ()).lower(*args), run)


def _attention_case(name: str, shapes: Shapes) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import flash_attention
    from pallas_kernels.testing import attention_inputs

    B, T, H, K, D = shapes.batch, shapes.seq, shapes.heads, shapes.kv_heads, shapes.head_dim
    q, k, v, do = attention_inputs(0, B, T, T, H, K, D, jnp.bfloat16)
    ids = np.broadcast_to(np.arange(T) // _doc_len(name, shapes) + 1, (B, T))
    if "segrandom" in name:  # 6 documents per row at random boundaries (the `gpu` tests' Packed(6))
        rng = np.random.default_rng(0)
        cuts = np.sort(rng.choice(np.arange(1, T), (B, 5), replace=False), axis=1)
        ids = (np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1) + 1
    segment_ids = None if "plain" in name else jnp.asarray(ids, jnp.int32)
    backend = "portable" if name.endswith("portable") else "mosaic"
    options = dict(causal=True, segment_ids=segment_ids, backend=backend, interpret=shapes.interpret,
                   deterministic=not name.endswith("atomic"))
    if "fwdbwd" not in name:
        _timed_jit(lambda q, k, v: flash_attention(q, k, v, **options), q, k, v)
        return

    def forward_backward(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, **options), q, k, v)
        return out, vjp(do)

    _timed_jit(forward_backward, q, k, v, do)


def _train_case(name: str, shapes: Shapes) -> None:
    import jax.numpy as jnp

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import scale_out

    from fa2jax.training import ModelParts, TrainState, make_optimizer, make_train_step, presets
    from pallas_kernels.fa2 import api

    # This child only: let segment ids reach the Hopper kernels, as the stalled run did.
    api.NOT_YET_ON_GPU = frozenset()
    run = presets()["target-1b"]
    layers = 2 if name.endswith("-2l") else shapes.train_layers
    config = run.model.replace(param_dtype=jnp.float32, attention_impl="pallas", max_len=shapes.seq,
                               num_layers=min(layers, shapes.train_layers))
    if shapes.interpret:  # --small: the CPU check runs a tiny model through XLA attention
        config = config.replace(d_model=128, num_heads=2, num_kv_heads=1, d_ff=256, vocab_size=512,
                                attention_impl="xla")
    cfg = dataclasses.replace(run.train, batch_size=shapes.batch, grad_accum=1, seq_len=shapes.seq, warmup_steps=0)
    parts = ModelParts.init(config, seed=0)
    tx = make_optimizer(cfg)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=parts.params, opt_state=tx.init(parts.params))
    parts = ModelParts(parts.config, parts.graphdef, None, parts.rest)
    step = make_train_step(parts, cfg, tx)
    batch = scale_out._batch(cfg.rows_per_step, cfg.seq_len, config.vocab_size, segment_len=_doc_len(name, shapes))
    def run(compiled):
        nonlocal state
        state, metrics = compiled(state, parts.rest, batch, None, None)
        return {"loss": float(metrics["loss"])}  # float() waits for the step

    _timed_phases(lambda: step.lower(state, parts.rest, batch, None, None), run)


def _decode_model(shapes: Shapes):
    from flax import nnx

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from decode_step import smollm2_135m

    from fa2jax import Transformer

    return Transformer(smollm2_135m(shapes.decode_layers), rngs=nnx.Rngs(0))


def _tree_kernels_case(shapes: Shapes) -> None:
    """The cache attention kernels at decode_step's sizes: decode of 1 and 16 tokens, trees of 8
    and 32 nodes (a binary heap), 9 query / 3 KV heads, cache of prompt + new tokens + 32 slots."""
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from decode_step import heap_tree

    from pallas_kernels import decode_attention, tree_attention

    H, K, D = 9, 3, 64
    capacity = shapes.prompt_len + shapes.new_tokens + 32
    context = shapes.prompt_len + shapes.new_tokens // 2
    rng = np.random.default_rng(0)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((1, capacity, K, D)), jnp.bfloat16) for _ in range(2))
    lengths = jnp.full((1,), context, jnp.int32)
    for label, n in (("decode1", 1), ("decode16", 16), ("tree8", 8), ("tree32", 32)):
        q = jnp.asarray(rng.standard_normal((1, n, H, D)), jnp.bfloat16)
        if label.startswith("decode"):
            call = lambda q, kc, vc, ln: decode_attention(q, kc, vc, ln, interpret=shapes.interpret)  # noqa: E731
        else:
            mask = heap_tree(n)
            call = lambda q, kc, vc, ln, mask=mask: tree_attention(  # noqa: E731
                q, kc, vc, ln, mask, interpret=shapes.interpret)
        _say(call=label)
        _timed_jit(call, q, k_cache, v_cache, lengths)


def _decode_case(name: str, shapes: Shapes) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from decode_step import heap_tree

    from spec import generate_incremental

    model = _decode_model(shapes)
    capacity = shapes.prompt_len + shapes.new_tokens + 32
    context = shapes.prompt_len + shapes.new_tokens // 2
    graphdef, params = nnx.split(model)
    cache = model.init_cache(1, capacity).replace(lengths=jnp.full((1,), context, jnp.int32))
    if name.startswith("decode-step"):
        def decode_step(params, cache, tokens):
            logits, cache = nnx.merge(graphdef, params).decode(tokens, cache)
            return jnp.argmax(logits[:, -1], axis=-1), cache

        _timed_jit(decode_step, params, cache, jnp.ones((1, 1), jnp.int32))
    elif name.startswith("verify"):
        mask, tokens = heap_tree(32), jnp.ones((1, 32), jnp.int32)

        def verify(params, cache):
            def body(i, c):
                logits, written = nnx.merge(graphdef, params).score_tree(tokens + i, mask, c)
                return written.replace(lengths=c.lengths + (logits[0, 0, 0] > 1e30).astype(jnp.int32))
            return jax.lax.fori_loop(0, 20, body, cache).lengths

        _timed_jit(verify, params, cache)
    else:  # generate_incremental compiles inside: the first call is compile + run, the second run only
        prompt = jnp.ones((1, shapes.prompt_len), jnp.int32)
        prompt_lengths = jnp.full((1,), shapes.prompt_len, jnp.int32)
        for phase in ("call1 (compile+run)", "call2 (run)"):
            start = time.perf_counter()
            jax.block_until_ready(generate_incremental(model, prompt, prompt_lengths,
                                                       max_new_tokens=shapes.new_tokens).tokens)
            _say(phase=phase, s=round(time.perf_counter() - start, 3))


def child(name: str, shapes: Shapes, timeout: float) -> None:
    # Print every thread's stack shortly before the parent's limit: where a hung call waits.
    faulthandler.dump_traceback_later(max(1.0, timeout - 3), exit=True)
    import jax

    _say(case=name, device=jax.devices()[0].device_kind, jax=jax.__version__)
    if name.startswith("fa-"):
        _attention_case(name, shapes)
    elif name == "tree-kernels-9x3":
        _tree_kernels_case(shapes)
    elif name.startswith("train-"):
        _train_case(name, shapes)
    else:
        _decode_case(name, shapes)
    _say(done=True)


def run_case(name: str, argv: list[str], timeout: float) -> dict:
    """Runs one case in a child, echoing its lines as they come; its phases, status and seconds.

    The lines are read by a thread, so that a child that hangs without printing (or cannot be
    ended: a process stuck in the GPU driver) still leaves this loop at the deadline."""
    command = [sys.executable, __file__, *argv, "--child", name]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    result = {"case": name, "status": "error", "phases": {}}
    lines: queue.Queue = queue.Queue()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    deadline = start + timeout + 5  # faulthandler ends the child at timeout - 3, after its stacks
    timed_out, last = False, ""
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.perf_counter()))
        except queue.Empty:
            timed_out = True
            break
        if line is None:
            break
        print(f"  [{name} {time.perf_counter() - start:6.1f}s] {line.rstrip()}", flush=True)
        timed_out |= line.startswith("Timeout (")  # faulthandler's header
        if re.match(r"[\w.]*(Error|Exception)\b", line):  # the exception line of a traceback
            last = line.strip()
        try:
            fields = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(fields, dict) and "phase" in fields:
            result["phases"][result.get("call", "") + fields["phase"]] = fields["s"]
        elif isinstance(fields, dict) and "call" in fields:
            result["call"] = fields["call"] + ":"
        elif isinstance(fields, dict) and fields.get("done"):
            result["status"] = "ok"
    proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        print(f"  [{name}] the child did not end after kill; going on", flush=True)
    if timed_out:
        done = list(result["phases"])
        result["status"] = f"TIMEOUT (last phase done: {done[-1] if done else 'none'})"
    elif result["status"] != "ok":
        result["status"] = f"error: {last[:150]}"
    result["seconds"] = round(time.perf_counter() - start, 1)
    result.pop("call", None)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(CASES), help=f"comma-separated cases among {list(CASES)}")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    p.add_argument("--budget", type=float, default=560.0,
                   help="seconds for all cases: a case that might not finish inside it is skipped")
    p.add_argument("--small", action="store_true", help="tiny shapes and the simulator: a CPU check of the script")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [c for c in args.only.split(",") if c not in CASES]
    if unknown:
        raise ValueError(f"unknown cases {unknown}: choose among {list(CASES)}")
    if args.timeout <= 5:
        raise ValueError(f"--timeout must be > 5 s, got {args.timeout=}")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    shapes = Shapes.small() if args.small else Shapes()
    if args.child:
        child(args.child, shapes, args.timeout)
        return
    passed = ["--timeout", str(args.timeout)] + (["--small"] if args.small else [])
    start, results = time.perf_counter(), []
    for name in args.only.split(","):
        if time.perf_counter() - start + args.timeout + 10 > args.budget:
            results.append({"case": name, "status": "skipped (budget)", "phases": {}, "seconds": 0.0})
            continue
        print(f"=== {name}: {CASES[name]}", flush=True)
        results.append(run_case(name, passed, args.timeout))
    print("\n| case | status | seconds | phases (s) |\n| --- | --- | --- | --- |")
    for r in results:
        phases = ", ".join(f"{k} {v}" for k, v in r["phases"].items())
        print(f"| {r['case']} | {r['status']} | {r['seconds']} | {phases} |")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
