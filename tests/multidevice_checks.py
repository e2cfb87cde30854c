"""Multi-device checks on 8 simulated CPU devices: sharded model, kernels, ring attention, context
parallel training, checkpoints across meshes and speculative decoding, each against the
single-device result.

The device count must be fixed before jax is imported, and tests/conftest.py imports jax first, so
tests/test_sharding.py runs this file in a subprocess:

    python tests/multidevice_checks.py [CHECK ...]     # all checks by default

It prints one line per check, "PASS <name> <seconds>" or "FAIL <name> <seconds>: <error>", and
exits with status 1 if any failed. Shapes are tiny: the cost is compilation (Pallas kernels run
interpreted on CPU).
"""

from __future__ import annotations

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# Eight CPU devices, after the flags that make the tests compile faster (tests/cpu_flags.py; those
# tests/test_sharding.py passes on in XLA_FLAGS are kept as given). The count comes last: it wins
# over a count given before it.
from cpu_flags import with_cpu_flags  # noqa: E402  (this file's folder, as a script's is on sys.path)

os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", "")) + " --xla_force_host_platform_device_count=8"

import functools  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import fa2jax  # noqa: E402
from fa2jax import checkpoint as ckpt  # noqa: E402
from fa2jax import sharding  # noqa: E402
from fa2jax.model import replace_config  # noqa: E402
from fa2jax.training import (  # noqa: E402
    ModelParts, TrainConfig, TrainState, make_optimizer, make_train_step, read_metrics)
from fa2jax.training.losses import cross_entropy_sum, token_cross_entropy_sum  # noqa: E402
from fa2jax.training.steps import token_layout  # noqa: E402
from pallas_kernels.fa2 import ring  # noqa: E402

COLLECTIVES = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(-start)?\(")
# f32 with HIGHEST matmuls: sharded sums differ from whole ones only in the order of additions,
# so errors are a few float32 roundings of the largest value.
RTOL = 1e-5


def _collectives(compiled_text: str) -> set[str]:
    return {m.group(1) for m in COLLECTIVES.finditer(compiled_text)}


def _close(name, got, want, rtol=RTOL):
    """max |got - want| <= rtol * max(1, max |want|)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if got.shape != want.shape:
        raise AssertionError(f"{name}: {got.shape=} != {want.shape=}")
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    bound = rtol * max(1.0, float(np.max(np.abs(want))) if want.size else 0.0)
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3g} > {bound:.3g}")


def _tree_close(name, got, want, rtol=RTOL):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), f"{name}: {len(got_leaves)=} {len(want_leaves)=}"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        _close(f"{name}[{i}]", g, w, rtol)


def _spec(x) -> P:
    spec = tuple(x.sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return P(*spec)


def _tiny(**overrides) -> fa2jax.TransformerConfig:
    return fa2jax.TransformerConfig.tiny(num_layers=1, tie_embeddings=False, **overrides)


def _batch(config, batch: int, length: int, seed: int = 1) -> dict:
    """A packed batch: two segments per row, positions restarting at each."""
    tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size, jnp.int32)
    cut = length // 2 + 1
    segment_ids = jnp.asarray(np.arange(length)[None, :] >= cut, jnp.int32).repeat(batch, 0) + 1
    positions = jnp.asarray(np.where(np.arange(length) >= cut, np.arange(length) - cut, np.arange(length)),
                            jnp.int32)[None].repeat(batch, 0)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def check_model_forward():
    """data=2,fsdp=2,model=2: parameters placed by the rules; the Pallas forward per shard equals
    the single-device forward; activations stay split by rows."""
    mesh = sharding.parse_mesh("data=2,fsdp=2,model=2")
    config = _tiny(attention_impl="pallas")
    model = fa2jax.Transformer(config, rngs=nnx.Rngs(0))
    batch = _batch(config, 4, 16)
    reference = replace_config(model, attention_impl="xla")(batch["tokens"], batch["segment_ids"])
    graphdef, state = nnx.split(model)
    placed = sharding.shard(state, mesh)
    layer = placed["layers"][0]
    assert _spec(layer["attn"]["query"]["kernel"][...]) == P("fsdp", "model"), layer["attn"]["query"]["kernel"]
    assert _spec(layer["attn"]["out"]["kernel"][...]) == P("model", None, "fsdp")
    assert _spec(layer["mlp"]["down"]["kernel"][...]) == P("model", "fsdp")
    assert _spec(placed["lm_head"]["kernel"][...]) == P("fsdp", "model")
    assert _spec(layer["attn_norm"]["scale"][...]) == P()

    forward = jax.jit(lambda state, tokens, ids: nnx.merge(graphdef, state)(tokens, segment_ids=ids))
    with jax.set_mesh(mesh):
        rows = sharding.batch_sharding(mesh)
        logits = forward(placed, jax.device_put(batch["tokens"], rows), jax.device_put(batch["segment_ids"], rows))
    _close("logits", logits, reference)
    assert _spec(logits)[0] == ("data", "fsdp"), logits.sharding


def check_gradients_and_train_step():
    """One AdamW step (2 micro-batches) on data=2,fsdp=2,model=2 equals the single-device step:
    gradients, loss, updated parameters and optimizer state; the state keeps its placement."""
    mesh = sharding.parse_mesh("data=2,fsdp=2,model=2")
    config = _tiny(attention_impl="pallas")  # the GPU default: the kernels per shard under grad and scan
    cfg = TrainConfig(steps=4, batch_size=4, grad_accum=2, seq_len=16, warmup_steps=1, learning_rate=1e-2)
    parts = ModelParts.init(config, seed=0)
    tx = make_optimizer(cfg)
    batch = {k: np.asarray(v) for k, v in _batch(config, 8, 16).items()}

    def loss(params, micro):
        return cross_entropy_sum(parts.logits(params, parts.rest, micro), micro["tokens"], micro["segment_ids"])[0]

    grad = jax.jit(jax.grad(loss))
    micro = {k: v[:4] for k, v in batch.items()}
    want_grads = grad(parts.params, micro)
    placed_params = sharding.shard(parts.params, mesh)
    with jax.set_mesh(mesh):
        got_grads = grad(placed_params, {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in micro.items()})
    _tree_close("gradients", got_grads, want_grads)

    def fresh_state():  # copies: a step donates (deletes) the state it is given
        params = jax.tree.map(jnp.copy, parts.params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    want_state, want_metrics = make_train_step(parts, cfg, tx)(fresh_state(), parts.rest, batch, None, None)
    state = sharding.shard(fresh_state(), mesh)
    placement = jax.tree.map(lambda x: x.sharding, state)
    got_state, got_metrics = make_train_step(parts, cfg, tx, mesh=mesh)(state, parts.rest, batch, None, None)
    for key in ("loss", "grad_norm", "targets"):
        _close(key, got_metrics[key], want_metrics[key])
    _tree_close("params after a step", got_state.params, want_state.params)
    _tree_close("optimizer state after a step", got_state.opt_state, want_state.opt_state)
    moved = [s for s, x in zip(jax.tree.leaves(placement), jax.tree.leaves(got_state))
             if not x.sharding.is_equivalent_to(s, x.ndim)]
    assert not moved, f"{len(moved)} state arrays changed placement in the step"


def _attention_inputs(B=2, T=16, N=4, S=32, H=8, K=4, D=16):
    keys = jax.random.split(jax.random.key(3), 7)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)  # noqa: E731
    q, k, v, do = (normal(keys[i], s) for i, s in enumerate([(B, T, H, D), (B, T, K, D), (B, T, K, D), (B, T, H, D)]))
    segments = jnp.asarray(np.arange(T)[None, :] >= 5, jnp.int32).repeat(B, 0)
    tq, kc, vc = normal(keys[4], (B, N, H, D)), normal(keys[5], (B, S, K, D)), normal(keys[6], (B, S, K, D))
    lengths = jnp.asarray([3, 20], jnp.int32)
    tree = np.eye(N, dtype=bool)
    tree[:, 0] = True
    tree[3, 1] = True  # 0 -> (1, 2), 1 -> 3
    return dict(q=q, k=k, v=v, do=do, segments=segments, tq=tq, kc=kc, vc=vc, lengths=lengths, tree=tree)


def check_attention_per_shard():
    """flash (forward and gradients), tree and decode attention on data=2,model=4 inputs: equal to
    the single-device results, and the compiled programs move no data between devices (no
    all-gather of q/k/v, no collective at all), both under jit with the mesh set and eagerly."""
    mesh = sharding.parse_mesh("data=2,model=4")
    x = _attention_inputs()
    tree = x["tree"]

    def flash(impl):
        def f(q, k, v, ids, do):
            out, vjp = jax.vjp(lambda q, k, v: fa2jax.dot_product_attention(
                q, k, v, is_causal=True, segment_ids=ids, implementation=impl), q, k, v)
            return (out, *vjp(do))
        return f

    calls = {
        "flash": (flash, ("q", "k", "v", "segments", "do")),
        "tree": (lambda impl: lambda q, k, v, n: fa2jax.tree_attention(q, k, v, n, tree, implementation=impl),
                 ("tq", "kc", "vc", "lengths")),
        "decode": (lambda impl: lambda q, k, v, n: fa2jax.decode_attention(q, k, v, n, implementation=impl),
                   ("tq", "kc", "vc", "lengths")),
    }
    heads = NamedSharding(mesh, P("data", None, "model"))
    rows = NamedSharding(mesh, P("data"))
    for name, (make, names) in calls.items():
        args = [x[n] for n in names]
        want = jax.jit(make("xla"))(*args)
        placed = [jax.device_put(a, heads if a.ndim == 4 else rows) for a in args]
        fn = jax.jit(make("pallas"))
        with jax.set_mesh(mesh):
            got = fn(*placed)
            found = _collectives(fn.lower(*placed).compile().as_text())
        assert not found, f"{name}: the sharded program communicates: {sorted(found)}"
        _tree_close(name, got, want, rtol=1e-5)
        for out in jax.tree.leaves(got):
            spec = tuple(out.sharding.spec) + (None,) * 4
            assert spec[0] == "data" and (out.ndim < 4 or spec[2] == "model"), (name, out.sharding)
    # Eagerly, with no mesh set: the inputs' own NamedShardings choose the split.
    eager = fa2jax.decode_attention(*[jax.device_put(x[n], heads if x[n].ndim == 4 else rows)
                                      for n in ("tq", "kc", "vc", "lengths")], implementation="pallas")
    assert _spec(eager) == P("data", None, "model"), eager.sharding


def check_ring_attention():
    """Causal ring attention (zig-zag, packed segments) over context=4, rows over data=2: equal to
    whole-sequence attention in value and gradient; the ring only passes K/V between neighbours."""
    n = 4
    mesh = sharding.parse_mesh(f"data=2,context={n}")
    B, T, H, K, D = 2, 64, 4, 2, 16
    keys = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(keys[0], (B, T, H, D))
    k, v = (jax.random.normal(key, (B, T, K, D)) for key in keys[1:3])
    do = jax.random.normal(keys[3], (B, T, H, D))
    ids = jnp.asarray(np.repeat([[1] * 20 + [2] * 30 + [3] * 14], B, 0), jnp.int32)

    def whole(q, k, v):
        return fa2jax.dot_product_attention(q, k, v, is_causal=True, segment_ids=ids, implementation="xla")

    seq = P("data", "context")
    local = jax.shard_map(lambda q, k, v, ids: ring.ring_attention(q, k, v, axis_name="context", causal=True,
                                                                  segment_ids=ids),
                          mesh=mesh, in_specs=(seq, seq, seq, seq), out_specs=seq, check_vma=False)

    def ringed(q, k, v):
        z = lambda a: ring.zigzag(a, n)  # noqa: E731
        return ring.unzigzag(local(z(q), z(k), z(v), z(ids)), n)

    def value_and_grads(f):
        return jax.jit(lambda q, k, v, do: (lambda out, vjp: (out, *vjp(do)))(*jax.vjp(f, q, k, v)))

    want = value_and_grads(whole)(q, k, v, do)
    fn = value_and_grads(ringed)
    with jax.set_mesh(mesh):
        got = fn(q, k, v, do)
        found = _collectives(fn.lower(q, k, v, do).compile().as_text())
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _close(f"ring {name}", g, w, rtol=1e-5)
    assert "collective-permute" in found and "all-gather" not in found, sorted(found)


def check_context_parallel_model():
    """The Transformer over context=2 and data=2,context=4 (ring attention, zig-zag order): the
    logits, loss and parameter gradients of the training layout equal the single device's (XLA
    attention), and so do the logits of a call in token order; the training program passes K/V
    around the ring and gathers nothing; what a ring cannot run raises, naming it."""
    config = _tiny(attention_impl="pallas")
    parts = ModelParts.init(config, seed=3)
    reference = ModelParts.init(config.replace(attention_impl="xla"), seed=3)  # the same parameters
    batch = _batch(config, 2, 64, seed=4)

    def loss(parts, params, batch, shards):
        layout = token_layout(batch, shards)
        logits = parts.logits(params, parts.rest, layout, zigzag=shards > 1)  # [B, T, V], zig-zag order
        return token_cross_entropy_sum(logits, layout["targets"], layout["target_mask"])[0], logits

    def value_and_grad(parts):
        return jax.jit(jax.value_and_grad(functools.partial(loss, parts), has_aux=True), static_argnums=2)

    (want_loss, want_logits), want_grads = value_and_grad(reference)(reference.params, batch, 1)
    _close("loss of the token layout", want_loss,
           cross_entropy_sum(want_logits, batch["tokens"], batch["segment_ids"])[0])
    for description, devices in (("context=2", 2), ("data=2,context=4", 8)):
        mesh = sharding.parse_mesh(description, devices=jax.devices()[:devices])
        shards = sharding.context_shards(mesh)
        with jax.set_mesh(mesh):
            compiled = value_and_grad(parts).lower(parts.params, batch, shards).compile()
            (got_loss, got_logits), got_grads = compiled(parts.params, batch)
        _close(f"{description} logits", ring.unzigzag(got_logits, shards), want_logits)
        _close(f"{description} loss", got_loss, want_loss)
        _tree_close(f"{description} gradients", got_grads, want_grads)
        found = _collectives(compiled.as_text())
        assert "collective-permute" in found and "all-gather" not in found, (description, sorted(found))

    mesh = sharding.parse_mesh("context=2", devices=jax.devices()[:2])
    with jax.set_mesh(mesh):  # token order in and out: the model permutes, and restores the order
        _close("context=2 logits in token order", jax.jit(parts.logits)(parts.params, parts.rest, batch), want_logits)
    bad = {"T=62": (parts, {k: v[:, :62] for k, v in batch.items()}, "divisible by 2 \\* num_shards"),
           "window": (ModelParts.init(_tiny(attention_impl="pallas", layer_windows=(8,)), seed=3), batch,
                      "no window"),
           "xla": (reference, batch, "implementation='xla' cannot run it")}
    for name, (model_parts, b, message) in bad.items():
        with jax.set_mesh(mesh):
            try:
                jax.eval_shape(model_parts.logits, model_parts.params, model_parts.rest, b)
            except ValueError as e:
                assert re.search(message, str(e)), (name, str(e))
            else:
                raise AssertionError(f"{name}: no ValueError")


def check_context_parallel_train_step():
    """One AdamW step of make_train_step (examples/train.py's step, 2 micro-batches) on
    data=2,context=2,model=2 equals the single-device step (XLA attention): loss, gradient norm,
    parameters and optimizer state."""
    mesh = sharding.parse_mesh("data=2,context=2,model=2")
    config = _tiny(attention_impl="pallas")
    cfg = TrainConfig(steps=4, batch_size=2, grad_accum=2, seq_len=32, warmup_steps=1, learning_rate=1e-2)
    parts = ModelParts.init(config, seed=0)
    reference = ModelParts.init(config.replace(attention_impl="xla"), seed=0)
    tx = make_optimizer(cfg)
    batch = {k: np.asarray(v) for k, v in _batch(config, 4, 32, seed=6).items()}

    def fresh_state():  # copies: a step donates (deletes) the state it is given
        params = jax.tree.map(jnp.copy, parts.params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    want_state, want_metrics = make_train_step(reference, cfg, tx)(fresh_state(), parts.rest, batch, None, None)
    state = sharding.shard(fresh_state(), mesh)
    got_state, got_metrics = make_train_step(parts, cfg, tx, mesh=mesh)(state, parts.rest, batch, None, None)
    for key in ("loss", "grad_norm", "targets"):
        _close(key, got_metrics[key], want_metrics[key])
    _tree_close("params after a step", got_state.params, want_state.params)
    _tree_close("optimizer state after a step", got_state.opt_state, want_state.opt_state)


def check_checkpoint_across_meshes():
    """A TrainState saved from data=4,model=2 restores straight into its shards on fsdp=8 and on
    one device, equal; load_pretrained(mesh=) places the parameters and gives the same logits."""
    config = _tiny(attention_impl="xla")
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=16, warmup_steps=1)
    parts = ModelParts.init(config, seed=2)
    tx = make_optimizer(cfg)
    tree = TrainState(step=jnp.asarray(3, jnp.int32), params=parts.params, opt_state=tx.init(parts.params)).to_tree()
    first, second = sharding.parse_mesh("data=4,model=2"), sharding.parse_mesh("fsdp=8")
    meta = {"model_config": ckpt.config_to_dict(config), "train_config": ckpt.config_to_dict(cfg)}
    with tempfile.TemporaryDirectory() as folder:
        saved = ckpt.save_checkpoint(folder, 3, sharding.shard(tree, first), meta)
        restored, _ = ckpt.load_checkpoint(saved, sharding.abstract_sharded(tree, second))
        whole, _ = ckpt.load_checkpoint(saved, tree)
        _tree_close("restored on fsdp=8", restored, tree, rtol=0)
        _tree_close("restored on one device", whole, tree, rtol=0)
        up = restored["params"]["layers"][0]["mlp"]["up"]["kernel"][...]
        assert _spec(up) == P("fsdp") and up.sharding.mesh == second, up.sharding
        mu = restored["opt_state"][1][0].mu["layers"][0]["mlp"]["up"]["kernel"][...]
        assert _spec(mu) == P("fsdp"), mu.sharding

        model = fa2jax.load_pretrained(saved, mesh=first)
        query = model.layers[0].attn.query.kernel[...]
        assert _spec(query) == P(None, "model") and query.sharding.mesh == first, query.sharding
        batch = _batch(config, 4, 16)
        want = fa2jax.load_pretrained(saved)(batch["tokens"])
        _close("logits of a placed load", model(batch["tokens"]), want)


def check_train_script_on_meshes():
    """examples/train.py --mesh: two steps on data=4,model=2 stopped after one and resumed on
    fsdp=8 give the losses of the same run on one device."""
    from fa2jax.training.command import main as train_command

    with tempfile.TemporaryDirectory() as folder:
        corpus = os.path.join(folder, "corpus")
        os.mkdir(corpus)
        for i in range(24):
            with open(os.path.join(corpus, f"m{i}.py"), "w") as f:
                f.write(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 6)
        base = ["--preset", "tiny", "--tokenizer", "bytes", "--data", corpus, "--steps", "2",
                "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "1",
                "--batch-size", "8", "--seq-len", "32", "--num-layers", "1", "--d-model", "32", "--d-ff", "64",
                "--head-dim", "8", "--no-progress", "--attention-impl", "xla", "--log-every", "1"]
        runs = {"one": [], "first": ["--mesh", "data=4,model=2", "--stop-after-minutes", "1e-6"],
                "second": ["--mesh", "fsdp=8", "--resume"]}
        for name, flags in runs.items():
            train_command(base + ["--out", os.path.join(folder, "one" if name == "one" else "meshes")] + flags)
        losses = {}
        for name in ("one", "meshes"):
            records = read_metrics(os.path.join(folder, name, "metrics.jsonl"))
            losses[name] = [r["loss"] for r in records if "loss" in r]
        assert len(losses["one"]) == 2 and len(losses["meshes"]) == 2, losses
        _close("losses of the resumed run on other meshes", losses["meshes"], losses["one"], rtol=1e-5)


def check_speculative_tensor_parallel():
    """SpeculativeDecoder with the target split over model=2 (the draft replicated) emits the same
    tokens as with the target on one device."""
    from spec import SpeculativeDecoder

    mesh = sharding.parse_mesh("model=2", devices=jax.devices()[:2])
    target = fa2jax.Transformer(fa2jax.TransformerConfig.tiny(num_layers=1, max_len=64), rngs=nnx.Rngs(7))
    draft = fa2jax.Transformer(fa2jax.TransformerConfig.tiny(num_layers=1, max_len=64), rngs=nnx.Rngs(8))
    prompt = jax.random.randint(jax.random.key(9), (2, 6), 0, 128, jnp.int32)
    lengths = jnp.asarray([6, 4], jnp.int32)
    want = SpeculativeDecoder(target, draft, tree=(1, 2)).generate(prompt, lengths, max_new_tokens=10)
    sharding.shard_model(target, mesh)
    assert _spec(target.layers[0].attn.key.kernel[...]) == P(None, "model")
    with jax.set_mesh(mesh):
        got = SpeculativeDecoder(target, draft, tree=(1, 2)).generate(prompt, lengths, max_new_tokens=10)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def main(names) -> int:
    assert jax.device_count() == 8, jax.devices()
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        print(f"unknown checks {unknown}; known: {sorted(CHECKS)}")
        return 2
    failed = 0
    for name in names or CHECKS:
        start = time.perf_counter()
        try:
            CHECKS[name]()
            print(f"PASS {name} {time.perf_counter() - start:.1f}", flush=True)
        except Exception as e:  # noqa: BLE001  (every failure is reported, then the next check runs)
            failed += 1
            detail = traceback.format_exc(limit=-3).replace("\n", " | ")
            print(f"FAIL {name} {time.perf_counter() - start:.1f}: {type(e).__name__}: {e} || {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
