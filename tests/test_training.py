"""Training pieces: checkpoints, losses, optimizer, one step, accumulation, resume, distillation."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fa2jax import checkpoint as ckpt
from fa2jax import load_pretrained
from fa2jax.config import RopeScalingConfig, TransformerConfig
from fa2jax.data import Document, PackedRows, pack_documents, split_documents, tokenize_documents
from fa2jax.tokenizer import ByteTokenizer
from fa2jax.training import (
    ModelParts,
    TrainConfig,
    TrainState,
    acceptance_sums,
    cross_entropy_sum,
    distillation_kl_sum,
    evaluate,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    model_config_from_dict,
    peak_flops,
    read_metrics,
    target_mask,
    train,
    training_flops_per_token,
)

SEQ = 32
MODEL = TransformerConfig.tiny(vocab_size=ByteTokenizer().vocab_size, max_len=SEQ)


def _tree_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def rows():
    """Real text (a few KB of the stdlib's own words) as byte tokens, packed into T=32 rows."""
    words = "def return import class self lambda yield while for if else None True False".split()
    rng = np.random.default_rng(0)
    docs = [Document(f"f{i}.py", " ".join(rng.choice(words, size=rng.integers(5, 60))) + "\n")
            for i in range(60)]
    corpus = split_documents(docs, 0.2)
    tok = ByteTokenizer()
    return (pack_documents(tokenize_documents(tok, corpus.train), SEQ),
            pack_documents(tokenize_documents(tok, corpus.val), SEQ))


def _cfg(**kw):
    base = dict(steps=6, batch_size=2, grad_accum=2, seq_len=SEQ, learning_rate=3e-3, warmup_steps=2,
                log_every=1, eval_every=3, eval_batches=2, checkpoint_every=3)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_and_rotation(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16), "layers": [jnp.zeros(2)]}
    opt_state = optax.adamw(1e-3).init(params)
    state = {"step": jnp.array(7, jnp.int32), "params": params, "opt_state": opt_state}
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, state, {"note": "x", "cfg": _cfg()}, ByteTokenizer(), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    (tmp_path / ".tmp_step_9_abc").mkdir()  # a write killed midway is invisible
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000003"
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    loaded, meta = ckpt.load_checkpoint(latest, target)
    assert _tree_equal(loaded, state) and loaded["params"]["b"].dtype == jnp.bfloat16
    assert meta["step"] == 3 and meta["note"] == "x" and meta["cfg"]["steps"] == 6
    assert isinstance(ckpt.read_tokenizer(latest), ByteTokenizer)
    # Only the params of a full training checkpoint, as for a teacher or an export.
    sub, _ = ckpt.load_checkpoint(latest, {"params": target["params"]}, strict=False)
    assert _tree_equal(sub["params"], params)
    with pytest.raises(ValueError, match="does not match"):
        ckpt.load_checkpoint(latest, {"params": target["params"]})
    wrong = {**target, "params": {**target["params"], "w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}}
    with pytest.raises(ValueError, match="w"):
        ckpt.load_checkpoint(latest, wrong)


def test_config_json_round_trip():
    cfg = TransformerConfig.draft_20m(rope_scaling=RopeScalingConfig("llama3", 8.0), attention_impl="xla")
    stored = json.loads(json.dumps(ckpt.config_to_dict(cfg)))
    assert stored["dtype"] == "bfloat16"
    back = model_config_from_dict(stored)
    assert ckpt.config_to_dict(back) == stored and back.rope_scaling == cfg.rope_scaling
    assert jnp.dtype(back.dtype) == jnp.bfloat16
    assert ckpt.config_from_dict(TrainConfig, ckpt.config_to_dict(_cfg())) == _cfg()


# ------------------------------------------------------------------------------ losses and metrics


def test_target_mask_respects_segments():
    seg = jnp.array([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(target_mask(seg), [[1, 0, 1, 0], [1, 1, 1, 1]])


def test_cross_entropy_sum_matches_direct_computation():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 7, size=(2, 5)), jnp.int32)
    seg = jnp.array([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    total, count = cross_entropy_sum(logits, tokens, seg)
    logp = jax.nn.log_softmax(logits)
    pairs = [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]  # (row, t) with a valid target t+1
    expect = -sum(float(logp[b, t, tokens[b, t + 1]]) for b, t in pairs)
    assert count == len(pairs)
    np.testing.assert_allclose(total, expect, rtol=1e-5)


def test_distillation_and_acceptance_limits():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 6, 11)) * 3, jnp.float32)
    seg = jnp.ones((2, 6), jnp.int32)
    assert abs(float(distillation_kl_sum(a, a, seg, 2.0))) < 1e-5
    assert float(distillation_kl_sum(a, b, seg, 1.0)) > 0.1
    same = acceptance_sums(a, a, seg)
    np.testing.assert_allclose([same["sampled"], same["greedy"]], [same["count"]] * 2, rtol=1e-5)
    diff = acceptance_sums(a, b, seg)
    assert 0 < diff["sampled"] < diff["count"] and same["count"] == 10


def test_schedule_and_flops():
    cfg = _cfg(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    np.testing.assert_allclose([lr(0), lr(10), lr(100)], [0.0, 1e-3, 1e-4], rtol=1e-5, atol=1e-9)
    assert lr(5) < lr(10) and lr(50) < lr(10)
    target = TransformerConfig.target_1b()
    flops = training_flops_per_token(target, 1_100_000_000, 2048)
    # By hand: untied, so the 32000 x 2048 input table is a lookup, not a matmul:
    # 6 * (1.1e9 - 65_536_000) + 12 * 22 layers * 32 heads * 64 * 2048 = 6_206_784_000 + 1_107_296_256.
    assert flops == 7_314_080_256
    assert training_flops_per_token(target.replace(tie_embeddings=True), 1_100_000_000, 2048) > flops
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10)


def test_peak_flops_by_device_kind():
    gpu = lambda kind: types.SimpleNamespace(platform="gpu", device_kind=kind)  # noqa: E731
    assert peak_flops(gpu("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(gpu("NVIDIA H100 PCIe")) == 756e12  # not the SXM figure
    assert peak_flops(gpu("NVIDIA H200")) == 989e12
    assert peak_flops(gpu("Tesla T4")) is None
    assert peak_flops(types.SimpleNamespace(platform="cpu", device_kind="cpu")) is None


# ---------------------------------------------------------------------------------- training steps


def _fresh(model_cfg, cfg):
    parts = ModelParts.init(model_cfg, cfg.seed)
    tx = make_optimizer(cfg)
    return parts, tx, TrainState(step=jnp.zeros((), jnp.int32), params=parts.params,
                                 opt_state=tx.init(parts.params))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_step_lowers_loss_on_a_fixed_batch(rows, dtype):
    train_rows, _ = rows
    model_cfg = MODEL.replace(dtype=dtype)
    cfg = _cfg(warmup_steps=0, learning_rate=1e-2, grad_accum=1, batch_size=4)
    parts, tx, state = _fresh(model_cfg, cfg)
    batch = {k: v[:4] for k, v in vars(train_rows).items()}
    fixed = PackedRows(**batch)  # the same 4 rows, for evaluate()
    before = evaluate(parts, state.params, fixed, 4, 1)["val_loss"]
    state, metrics = make_train_step(parts, cfg, tx)(state, parts.rest, batch, None, None)
    after = evaluate(parts, state.params, fixed, 4, 1)["val_loss"]
    assert after < before - 0.05
    assert int(state.step) == 1 and np.isfinite(metrics["grad_norm"])
    # f32 master weights, whatever the compute dtype.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_gradient_accumulation_matches_one_big_batch(rows):
    train_rows, _ = rows
    batch = {k: v[:4] for k, v in vars(train_rows).items()}
    results = []
    for accum, size in ((1, 4), (2, 2)):
        cfg = _cfg(grad_accum=accum, batch_size=size)
        parts, tx, state = _fresh(MODEL, cfg)
        state, metrics = make_train_step(parts, cfg, tx)(state, parts.rest, batch, None, None)
        results.append((state.params, float(metrics["loss"])))
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_flash_attention_kernel_gives_the_same_gradients(rows):
    """The packed-batch loss through the Pallas FA2 kernel (interpreted on CPU) matches XLA's."""
    train_rows, _ = rows
    busiest = np.argsort(-train_rows.segment_ids.max(axis=1), kind="stable")[:2]
    batch = {k: v[busiest] for k, v in vars(train_rows).items()}
    assert batch["segment_ids"].max(axis=1).min() > 1  # documents share rows: the segment mask matters
    out = {}
    for impl in ("xla", "pallas"):
        parts = ModelParts.init(MODEL.replace(attention_impl=impl), seed=0)

        def loss(params, parts=parts):
            total, count = cross_entropy_sum(parts.logits(params, parts.rest, batch), batch["tokens"],
                                             batch["segment_ids"])
            return total / count

        out[impl] = jax.jit(jax.value_and_grad(loss))(parts.params)
    (l_x, g_x), (l_p, g_p) = out["xla"], out["pallas"]
    np.testing.assert_allclose(l_p, l_x, rtol=1e-5)
    diff = optax.tree.norm(jax.tree.map(jnp.subtract, g_p, g_x))
    # f32 throughout; the kernels only reorder the softmax sums (online softmax), so agreement
    # is near f32 rounding, far below the gradient itself.
    assert diff <= 1e-4 * optax.tree.norm(g_x)


# ---------------------------------------------------------------------------------- the whole loop


@pytest.mark.slow
def test_resume_continues_exactly(rows, tmp_path):
    train_rows, val_rows = rows
    cfg = _cfg()
    whole = train(MODEL, cfg, train_rows, val_rows, tmp_path / "whole", ByteTokenizer(), progress=False)
    train(MODEL, cfg, train_rows, val_rows, tmp_path / "split", ByteTokenizer(), stop_at=3, progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")] == [3]
    split = train(MODEL, cfg, train_rows, val_rows, tmp_path / "split", ByteTokenizer(), resume=True,
                  progress=False)

    target = _fresh(MODEL, cfg)[2].to_tree()
    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / run / "checkpoints"), target)[0]
            for run in ("whole", "split"))
    assert int(a["step"]) == int(b["step"]) == 6
    assert _tree_equal(a, b)  # parameters and optimizer state, bit for bit
    assert whole["val_loss"] == split["val_loss"]
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "split" / "loss.png").stat().st_size > 1000
    # Loss went down over the run, validation was measured.
    losses = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] and np.isfinite(whole["val_ppl"])
    # A resume may change the optimizer's settings, not the data each step sees.
    with pytest.raises(ValueError, match="seed"):
        train(MODEL, _cfg(seed=1), train_rows, val_rows, tmp_path / "split", resume=True, progress=False)


@pytest.mark.slow
def test_distillation_raises_acceptance(rows, tmp_path):
    train_rows, val_rows = rows
    trained = train(MODEL, _cfg(steps=12, checkpoint_every=12), train_rows, val_rows, tmp_path / "teacher",
                    ByteTokenizer(), progress=False)
    teacher = ModelParts.from_model(load_pretrained(tmp_path / "teacher"))
    assert ckpt.config_to_dict(teacher.config) == ckpt.config_to_dict(MODEL)
    batch = {k: v[:2] for k, v in vars(val_rows).items()}
    via_module = teacher.module()(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    np.testing.assert_array_equal(via_module, teacher.logits(teacher.params, teacher.rest, batch))
    # The loaded weights are the trained ones: same validation loss as the run reported.
    reloaded = evaluate(teacher, teacher.params, val_rows, batch_size=2, max_batches=2)["val_loss"]
    assert reloaded == pytest.approx(trained["val_loss"], rel=1e-6)
    draft_cfg = MODEL.replace(num_layers=1, d_model=16, head_dim=4, d_ff=32)
    out = train(draft_cfg, _cfg(steps=8, distill_weight=1.0, checkpoint_every=8, seed=1), train_rows, val_rows,
                tmp_path / "draft", ByteTokenizer(), teacher=tmp_path / "teacher", progress=False)
    before, after = out["acceptance_before"], out["acceptance_after"]
    # Both start near uniform, so acceptance is high from the start; distillation must still
    # remove a good part of the remaining mismatch (total variation distance = 1 - acceptance).
    assert 1 - after["acceptance_sampled"] < 0.7 * (1 - before["acceptance_sampled"])
    kl = [r["distill_kl"] for r in read_metrics(tmp_path / "draft" / "metrics.jsonl") if "loss" in r]
    assert len(kl) == 8 and kl[-1] < kl[0]
    # Stopped for time: the summary describes the model at the stopping step.
    stopped = train(draft_cfg, _cfg(steps=8, distill_weight=1.0, checkpoint_every=8, seed=1), train_rows, val_rows,
                    tmp_path / "stopped", ByteTokenizer(), teacher=tmp_path / "teacher", progress=False,
                    stop_after_seconds=0.0)
    assert stopped["step"] < 8 and "acceptance_after" in stopped
    evals = [r for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl") if "val_loss" in r]
    assert evals[-1]["step"] == stopped["step"] and evals[-1]["val_loss"] == stopped["val_loss"]
    with pytest.raises(ValueError, match="one vocabulary"):
        train(MODEL.replace(vocab_size=300), _cfg(), train_rows, val_rows, tmp_path / "bad",
              teacher=tmp_path / "teacher", progress=False)
