"""Scale-out benchmark: data-parallel training of the target-1b preset on N GPUs vs one, and ring
attention at 128k tokens per GPU vs the single-GPU kernel, alone and inside the Transformer.

    PYTHONPATH=. python benchmarks/scale_out.py --out $OUT            # every GPU of the machine
    PYTHONPATH=. python benchmarks/scale_out.py --out $OUT --gpus 2 4 --meshes fsdp=N data=2,model=N/2
    PYTHONPATH=. python benchmarks/scale_out.py --out $OUT --skip-training      # ring attention only

Training: the `target-1b` preset (1.1B parameters, bf16 compute, float32 parameters and AdamW
state, Pallas attention) on random packed rows of 2048 tokens, `--per-gpu-batch` rows per GPU per
micro-batch, so every count of GPUs does the same work per GPU. One GPU runs without a mesh (as a
user runs it); N GPUs run `examples/train.py --mesh data=N`'s step (`fa2jax.sharding`), and any
`--meshes` given besides (N in a description stands for the GPU count). Throughput is the median
of timed steps after warm-up; scaling efficiency = tokens/s on N GPUs / (N x tokens/s on one).
The issue's bar: >= 90% for data parallel.

Ring attention: causal, B=1, H=K=16, D=128, bf16 (the 128k case of benchmarks/flash_attention.py),
`--ring-tokens` per GPU: the single-GPU kernel on that many tokens vs `pallas_kernels.fa2.ring` over
context=N on N times as many (zig-zag layout). FLOPs: forward 4*B*T^2*H*D/2 for causal, forward +
backward 3.5x that; per-GPU TFLOP/s divides the ring's by N. The issue's bar: the ring's per-GPU
TFLOP/s >= 80% of the single-GPU kernel's.

Ring attention in the Transformer (context parallelism): `examples/train.py --mesh context=N`'s
train step (`fa2jax.sharding`: zig-zag token order, ring attention in every layer) on one row of
N x `--ring-tokens` tokens, vs the same step on one GPU on one row of `--ring-tokens` (the plain
kernel): the target-1b preset's width with `--ring-layers` layers and a `--ring-vocab` vocabulary
(so that 128k tokens of activations and logits fit without rematerialisation), one document per
row. Tokens/s per GPU falls with N by design (each token attends to N times as many); the fair
comparison is model TFLOP/s per GPU: 6 x matmul parameters + 6 x L x H x D x T per token (PaLM's
count, its attention term halved for causal masking), times tokens/s, over N.

Prints a table and writes <out>/scale_out.json (GPU model, JAX version, date, command).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fa2jax import sharding
from fa2jax.training import (
    ModelParts, TrainState, count_params, make_optimizer, make_train_step, presets, training_flops_per_token)
from pallas_kernels import flash_attention
from pallas_kernels.fa2 import ring
from pallas_kernels.testing import attention_inputs, median_time

SEGMENT_LEN = 512  # packed rows: a document boundary every 512 tokens


def _batch(rows: int, seq_len: int, vocab: int, seed: int = 0, segment_len: int = SEGMENT_LEN) -> dict:
    rng = np.random.default_rng(seed)
    index = np.arange(seq_len)
    return {"tokens": rng.integers(0, vocab, (rows, seq_len), dtype=np.int32),
            "segment_ids": np.broadcast_to(index // segment_len + 1, (rows, seq_len)).astype(np.int32),
            "positions": np.broadcast_to(index % segment_len, (rows, seq_len)).astype(np.int32)}


def _time_train_step(config, cfg, num_gpus: int, mesh_description: str | None, steps: int,
                     segment_len: int = SEGMENT_LEN) -> tuple[float, float, int]:
    """(median seconds per step, last loss, parameter count) of `make_train_step` for `config` and
    `cfg` on the first `num_gpus` GPUs under the mesh described (None: one GPU, no mesh)."""
    mesh = None
    if mesh_description is not None:
        mesh = sharding.parse_mesh(mesh_description, devices=jax.devices()[:num_gpus])
    parts = ModelParts.init(config, seed=0)
    num_params = count_params(parts.params)
    tx = make_optimizer(cfg)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=parts.params, opt_state=tx.init(parts.params))
    if mesh is not None:
        state = sharding.shard(state, mesh)
    parts = ModelParts(parts.config, parts.graphdef, None, parts.rest)
    step = make_train_step(parts, cfg, tx, mesh=mesh)
    batch = _batch(cfg.rows_per_step, cfg.seq_len, config.vocab_size, segment_len=segment_len)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], parts.rest, batch, None, None)
        return metrics["loss"]

    seconds = median_time(one_step, iters=steps, warmup=2)
    loss = float(one_step())
    del holder, state
    gc.collect()
    return seconds, loss, num_params


def train_throughput(num_gpus: int, mesh_description: str | None, args) -> dict:
    """Tokens/s of the preset's train step on the first `num_gpus` GPUs (no mesh: one GPU, plain)."""
    run = presets()[args.preset]
    config = run.model.replace(param_dtype=jnp.float32, attention_impl="pallas", max_len=args.seq_len)
    cfg = dataclasses.replace(run.train, batch_size=args.per_gpu_batch * num_gpus, grad_accum=args.grad_accum,
                              seq_len=args.seq_len, warmup_steps=0)
    seconds, loss, _ = _time_train_step(config, cfg, num_gpus, mesh_description, args.steps)
    tokens = cfg.tokens_per_step
    return {"gpus": num_gpus, "mesh": mesh_description or "none (1 GPU)", "global_batch_rows": cfg.rows_per_step,
            "seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "loss": loss}


def _model_flops_per_token(config, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token of causal rows of `seq_len` (`training_flops_per_token`, whose
    attention term counts the whole T x T square, with that term halved)."""
    square = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return training_flops_per_token(config, num_params, seq_len) - square / 2


def ring_model_throughput(num_gpus: int, args) -> dict:
    """The Transformer's train step on one row of `num_gpus` x `--ring-tokens` tokens: over
    context=`num_gpus` (ring attention), or on one GPU without a mesh when `num_gpus` is 1."""
    run = presets()[args.preset]
    seq_len = args.ring_tokens * num_gpus
    config = run.model.replace(param_dtype=jnp.float32, attention_impl="pallas", max_len=seq_len,
                               num_layers=args.ring_layers, vocab_size=args.ring_vocab, tokenizer_vocab_size=None)
    cfg = dataclasses.replace(run.train, batch_size=1, grad_accum=1, seq_len=seq_len, warmup_steps=0)
    mesh_description = f"context={num_gpus}" if num_gpus > 1 else None
    seconds, loss, num_params = _time_train_step(config, cfg, num_gpus, mesh_description, args.ring_steps,
                                                 segment_len=seq_len)
    tokens_per_gpu_s = seq_len / seconds / num_gpus
    return {"gpus": num_gpus, "mesh": mesh_description or "none (1 GPU)", "seq_len": seq_len,
            "tokens_per_gpu": args.ring_tokens, "layers": config.num_layers, "vocab": config.vocab_size,
            "params": num_params, "seconds_per_step": seconds, "tokens_per_gpu_s": tokens_per_gpu_s,
            "tflops_per_gpu": tokens_per_gpu_s * _model_flops_per_token(config, num_params, seq_len) / 1e12,
            "loss": loss}


def _attention_flops(seq_len: int, heads: int, head_dim: int) -> float:
    return 4.0 * seq_len * seq_len * heads * head_dim / 2  # causal, B = 1


def ring_throughput(num_gpus: int, args) -> dict:
    """Per-GPU TFLOP/s of causal attention: the kernel on one GPU, the ring over `num_gpus`."""
    H, D, T = 16, 128, args.ring_tokens
    q, k, v, do = attention_inputs(0, 1, T, T, H, H, D, jnp.bfloat16)

    def fwd_bwd(attention):
        def run(q, k, v, do):
            out, vjp = jax.vjp(attention, q, k, v)
            return vjp(do)
        return jax.jit(run)

    single = lambda q, k, v: flash_attention(q, k, v, causal=True)  # noqa: E731
    row = {"gpus": num_gpus, "tokens_per_gpu": T, "heads": H, "head_dim": D}
    flops = _attention_flops(T, H, D)
    row["single_fwd_tflops"] = flops / median_time(jax.jit(single), iters=5, args=(q, k, v), warmup=2) / 1e12
    row["single_fwd_bwd_tflops"] = 3.5 * flops / median_time(fwd_bwd(single), iters=5, args=(q, k, v, do),
                                                              warmup=2) / 1e12
    del q, k, v, do
    mesh = sharding.parse_mesh(f"context={num_gpus}", devices=jax.devices()[:num_gpus])
    seq = NamedSharding(mesh, P(None, "context"))
    total = T * num_gpus
    q, k, v, do = (jax.device_put(x, seq) for x in attention_inputs(1, 1, total, total, H, H, D, jnp.bfloat16))
    spec = P(None, "context")
    ringed = jax.shard_map(lambda q, k, v: ring.ring_attention(q, k, v, axis_name="context", causal=True),
                           mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    per_gpu = _attention_flops(total, H, D) / num_gpus
    with jax.set_mesh(mesh):
        row["ring_fwd_tflops"] = per_gpu / median_time(jax.jit(ringed), iters=5, args=(q, k, v), warmup=2) / 1e12
        row["ring_fwd_bwd_tflops"] = 3.5 * per_gpu / median_time(fwd_bwd(ringed), iters=5, args=(q, k, v, do),
                                                                  warmup=2) / 1e12
    row["fwd_ratio"] = row["ring_fwd_tflops"] / row["single_fwd_tflops"]
    row["fwd_bwd_ratio"] = row["ring_fwd_bwd_tflops"] / row["single_fwd_bwd_tflops"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for scale_out.json")
    p.add_argument("--gpus", type=int, nargs="+", help="GPU counts to run on (default: all GPUs)")
    p.add_argument("--meshes", nargs="*", default=[],
                   help="more meshes to time besides data=N, e.g. fsdp=N data=2,model=N/2 (N = the GPU count)")
    p.add_argument("--preset", default="target-1b", choices=sorted(presets()), help="model to train")
    p.add_argument("--per-gpu-batch", type=int, default=4, help="rows per GPU per micro-batch (the preset's 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    p.add_argument("--ring-tokens", type=int, default=131072, help="sequence length per GPU for ring attention")
    p.add_argument("--ring-layers", type=int, default=2, help="layers of the Transformer timed with ring attention")
    p.add_argument("--ring-vocab", type=int, default=8192, help="its vocabulary (logits of 128k tokens are large)")
    p.add_argument("--ring-steps", type=int, default=5, help="timed training steps per ring configuration")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-ring", action="store_true")
    p.add_argument("--skip-ring-model", action="store_true", help="time ring attention alone, not in the Transformer")
    args = p.parse_args()
    if jax.default_backend() != "gpu":  # a smoke run of the script itself: its numbers mean nothing
        print(f"not a GPU ({jax.default_backend()=}): the kernels run interpreted", flush=True)
    counts = args.gpus or [jax.device_count()]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": jax.devices()[0].device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
              "command": " ".join(sys.argv), "training": [], "ring": [], "ring_model": []}

    def save():
        (out / "scale_out.json").write_text(json.dumps(result, indent=1))

    if not args.skip_training:
        baseline = train_throughput(1, None, args)
        result["training"].append(baseline)
        print(f"1 GPU: {baseline['tokens_per_s']:.0f} tokens/s", flush=True)
        save()
        for n in counts:
            descriptions = [f"data={n}"] + [m.replace("N/2", str(n // 2)).replace("N", str(n)) for m in args.meshes]
            for description in descriptions if n > 1 else []:
                row = train_throughput(n, description, args)
                row["efficiency"] = row["tokens_per_s"] / (n * baseline["tokens_per_s"])
                result["training"].append(row)
                print(f"{n} GPUs {description}: {row['tokens_per_s']:.0f} tokens/s, efficiency "
                      f"{row['efficiency']:.1%}", flush=True)
                save()
    if not args.skip_ring:
        for n in counts:
            row = ring_throughput(n, args)
            result["ring"].append(row)
            print(f"ring over {n} GPUs, {row['tokens_per_gpu']} tokens each: fwd {row['ring_fwd_tflops']:.0f} vs "
                  f"{row['single_fwd_tflops']:.0f} TFLOP/s ({row['fwd_ratio']:.1%}), fwd+bwd "
                  f"{row['ring_fwd_bwd_tflops']:.0f} vs {row['single_fwd_bwd_tflops']:.0f} "
                  f"({row['fwd_bwd_ratio']:.1%})", flush=True)
            save()
    if not args.skip_ring and not args.skip_ring_model:
        single = ring_model_throughput(1, args)
        result["ring_model"].append(single)
        print(f"Transformer, 1 GPU, {single['seq_len']} tokens: {single['tokens_per_gpu_s']:.0f} tokens/s, "
              f"{single['tflops_per_gpu']:.0f} TFLOP/s", flush=True)
        save()
        for n in counts:
            if n == 1:
                continue
            row = ring_model_throughput(n, args)
            row["tflops_ratio"] = row["tflops_per_gpu"] / single["tflops_per_gpu"]
            result["ring_model"].append(row)
            print(f"Transformer over context={n}, {row['seq_len']} tokens: {row['tokens_per_gpu_s']:.0f} tokens/s "
                  f"per GPU, {row['tflops_per_gpu']:.0f} TFLOP/s per GPU ({row['tflops_ratio']:.1%} of 1 GPU)",
                  flush=True)
            save()

    print(f"\n{result['gpu']}, JAX {result['jax']}, {result['date']}")
    print("| GPUs | mesh | rows/step | tokens/s | efficiency |\n|---|---|---|---|---|")
    for row in result["training"]:
        efficiency = f"{row['efficiency']:.1%}" if "efficiency" in row else "-"
        print(f"| {row['gpus']} | {row['mesh']} | {row['global_batch_rows']} | {row['tokens_per_s']:.0f} "
              f"| {efficiency} |")
    print("\n| GPUs | tokens/GPU | ring fwd | 1 GPU fwd | ratio | ring fwd+bwd | 1 GPU fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["ring"]:
        print(f"| {row['gpus']} | {row['tokens_per_gpu']} | {row['ring_fwd_tflops']:.0f} "
              f"| {row['single_fwd_tflops']:.0f} | {row['fwd_ratio']:.1%} | {row['ring_fwd_bwd_tflops']:.0f} "
              f"| {row['single_fwd_bwd_tflops']:.0f} | {row['fwd_bwd_ratio']:.1%} |")
    print("\n| GPUs | mesh | row tokens | tokens/s per GPU | TFLOP/s per GPU | vs 1 GPU |\n|---|---|---|---|---|---|")
    for row in result["ring_model"]:
        ratio = f"{row['tflops_ratio']:.1%}" if "tflops_ratio" in row else "-"
        print(f"| {row['gpus']} | {row['mesh']} | {row['seq_len']} | {row['tokens_per_gpu_s']:.0f} "
              f"| {row['tflops_per_gpu']:.0f} | {ratio} |")
    print(f"wrote {out / 'scale_out.json'}")


if __name__ == "__main__":
    main()
