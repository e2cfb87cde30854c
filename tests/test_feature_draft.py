"""The EAGLE-style feature head (fa2jax.feature_head), its drafter (spec.FeatureDrafter) and its
training (fa2jax.training.feature_draft), on tiny f32 models (CPU).

Speculative decoding with the head is lossless whatever the head's quality (greedy: token for
token; stochastic: chi-square against the exact target distribution, the helper of
test_spec_decoder.py), the drafter's tree and its cache match an uncached recomputation from the
target's features, and training lowers the EAGLE loss.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fa2jax import Transformer, TransformerConfig
from fa2jax import checkpoint as ckpt
from fa2jax.data import pack_documents
from fa2jax.feature_head import (
    FeatureHead, FeatureHeadConfig, count_params, is_feature_head, load_feature_head, read_feature_head_config,
    save_feature_head)
from fa2jax.training import TrainConfig
from fa2jax.model import with_invariant_rows
from fa2jax.training.feature_draft import (
    FeatureLossConfig, evaluate_feature_head, feature_loss_sums, make_feature_train_step, target_features,
    train_feature_head)
from fa2jax.training.optimizer import make_optimizer
from spec import DynamicTree, ExpansionTree, FeatureDrafter, MergedTree, SpeculativeDecoder, generate_incremental

sys.path.insert(0, os.path.dirname(__file__))
from test_spec_decoder import SMALL_VOCAB, _sequence_pvalue, greedy_state  # noqa: E402

TEST_SEED = int(os.environ.get("FA2JAX_TEST_SEED", "0"))
VOCAB = 48  # no width of the tiny model: a [V, d] leaf would stand out


@pytest.fixture(scope="module")
def models():
    seed = int(np.random.default_rng(TEST_SEED).integers(2**31))
    target = Transformer(TransformerConfig.tiny(vocab_size=VOCAB), rngs=nnx.Rngs(seed))
    head = FeatureHead(FeatureHeadConfig.for_target(target.config), rngs=nnx.Rngs(seed + 1))
    return target, head


def _prompts(lengths, width):
    rng = np.random.default_rng(TEST_SEED)
    return jnp.asarray(rng.integers(0, VOCAB, (len(lengths), width)), jnp.int32), jnp.asarray(lengths, jnp.int32)


def test_head_owns_one_layer_and_no_embedding_or_lm_head(models):
    target, head = models
    for model in (target, Transformer(target.config.replace(tie_embeddings=False), rngs=nnx.Rngs(0))):
        params = nnx.state(FeatureHead(FeatureHeadConfig.for_target(model.config), rngs=nnx.Rngs(0)), nnx.Param)
        paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        assert paths and not any("embed" in p or "lm_head" in p for p in paths)
        assert not any(VOCAB in x.shape for x in jax.tree.leaves(params))
    d, c = target.config.d_model, target.config
    block = nnx.state(target.layers[0], nnx.Param)
    assert count_params(head) == 2 * d * d + d + sum(x.size for x in jax.tree.leaves(block))
    # The drafter's params hold the target's own embedding array, not a copy, and nothing of its layers.
    drafter = FeatureDrafter(head, target)
    assert drafter.params["shared"]["embed"]["embedding"][...] is target.embed.embedding[...]
    assert "layers" not in drafter.params["shared"] and c.num_layers == 2


NEW_TOKENS = 14


@pytest.fixture(scope="module")
def greedy_baseline(models):
    prompt, lengths = _prompts([5, 2, 7], 7)
    return prompt, lengths, generate_incremental(models[0], prompt, lengths, max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("tree", [ExpansionTree.chain(4), DynamicTree(num_nodes=10, depth=4, top_k=3)],
                         ids=["chain", "dynamic"])
def test_greedy_matches_incremental(models, greedy_baseline, tree):
    target, head = models
    prompt, lengths, baseline = greedy_baseline
    decoder = SpeculativeDecoder(target, FeatureDrafter(head, target), tree=tree)
    result = decoder.generate(prompt, lengths, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(result.tokens), np.asarray(baseline.tokens))
    np.testing.assert_array_equal(np.asarray(result.lengths), np.asarray(baseline.lengths))
    # A random head still gets tokens accepted now and then: commits of several nodes are exercised.
    assert np.asarray(result.stats.accepted_histogram)[2:].sum() > 0


def test_merged_with_a_model_draft(models, greedy_baseline):
    """A feature drafter next to a plain model draft in one merged tree (only one needs hidden
    states), with wider levels than a chain."""
    target, head = models
    prompt, lengths, baseline = greedy_baseline
    small = Transformer(target.config.replace(num_layers=1), rngs=nnx.Rngs(7))
    decoder = SpeculativeDecoder(target, [small, FeatureDrafter(head, target)],
                                 tree=MergedTree((ExpansionTree((2, 1)), ExpansionTree((2, 2)))))
    result = decoder.generate(prompt, lengths, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(result.tokens), np.asarray(baseline.tokens))


def _uncached_head_chain(target, head, tokens, n, depth):
    """The head's rows recomputed from scratch (no cache), for comparison with the drafter.

    Args:
      tokens: right-padded rows of committed tokens followed by the root.  # [B, L] int32, L >= max n + 1 + depth
      n: committed tokens per row (the root is tokens[b, n[b]]).  # [B] int32
      depth: chain levels to draft greedily.

    Returns:
      (inputs of the committed rows: features f_0..f_{n-2} and embeddings of x_1..x_{n-1}, [B, L, d]
      each; the target's feature f_{n-1} [B, d]; drafted tokens [B, depth]). Level k reads the
      feature the head predicted at level k - 1.
    """
    rows = jnp.arange(tokens.shape[0])
    _, hidden = target(tokens, return_hidden=True)  # [B, L, d]; positions past n are overwritten below
    features = hidden
    drafted = []
    for k in range(depth):
        # Row i reads (features[i], tokens[i + 1]); rows at or past n read predicted features.
        nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
        out = head(features, target.embed_tokens(nxt))  # [B, L, d]
        pred = out[rows, n - 1 + k]  # [B, d]: the feature of the token at n + k
        token = jnp.argmax(target.head_logits(pred[:, None])[:, 0], -1).astype(jnp.int32)
        drafted.append(token)
        features = features.at[rows, n + k].set(pred)
        tokens = tokens.at[rows, n + k + 1].set(token)
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    return hidden, target.embed_tokens(nxt), hidden[rows, n - 1], jnp.stack(drafted, 1)


def test_steps_commit_rows_from_the_target_features_and_draft_greedily(models):
    """After a few steps, (1) the head's cache holds exactly the K/V of its rows (f_i, x_{i+1}) over
    the committed tokens with the target's true features, and (2) a drafted chain is the head's own
    greedy continuation, each level reading the feature it predicted at the level above."""
    target, head = models
    depth = 3
    decoder = SpeculativeDecoder(target, FeatureDrafter(head, target), tree=ExpansionTree.chain(depth))
    prompt, lengths = _prompts([4, 2, 5], 5)
    state = greedy_state(decoder, prompt, lengths, max_new_tokens=12, steps=2)
    assert not state.done.any()
    draft = state.draft_caches[0]
    tree, _ = jax.jit(decoder.draft)(decoder._draft_params, state.draft_caches, state.root, jax.random.key(1),
                                     0.0, 1.0)
    n = jnp.asarray(state.lengths) - 1  # committed tokens per row; the root follows them
    np.testing.assert_array_equal(np.asarray(draft.cache.lengths), np.asarray(n) - 1)
    width = state.tokens.shape[1] + depth + 1
    tokens = jnp.pad(jnp.where(jnp.arange(state.tokens.shape[1]) <= n[:, None], state.tokens, 0),
                     ((0, 0), (0, width - state.tokens.shape[1])))

    @jax.jit
    def expected(head_params, target_params):
        h, t = nnx.merge(*nnx.split(head)[:1], head_params), nnx.merge(*nnx.split(target)[:1], target_params)
        features, embeddings, last, drafted = _uncached_head_chain(t, h, tokens, n, depth)
        cache = h.prefill(features, embeddings, n - 1, h.init_cache(3, width))[1]
        return cache, last, drafted

    fresh, last, drafted = expected(nnx.state(head), nnx.state(target))
    for b in range(3):
        rows = slice(0, int(n[b]) - 1)
        np.testing.assert_allclose(draft.cache.keys[0, b, rows], fresh.keys[0, b, rows], atol=1e-5)
        np.testing.assert_allclose(draft.cache.values[0, b, rows], fresh.values[0, b, rows], atol=1e-5)
    np.testing.assert_allclose(draft.feature, last, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(tree.tokens[:, 1:]), np.asarray(drafted))


def test_return_hidden_gives_the_vector_the_head_reads(models):
    """Each call's hidden states give its logits through `head_logits` and agree across calls
    (decode through the batch-invariant path too)."""
    target, _ = models
    prompt, lengths = _prompts([5, 3], 6)
    invariant = with_invariant_rows(target, 4)

    @jax.jit
    def calls(model_params, invariant_params):
        model = nnx.merge(nnx.split(target)[0], model_params)
        inv = nnx.merge(nnx.split(invariant)[0], invariant_params)
        logits, cache, hidden = model.prefill(prompt, lengths, model.init_cache(2, 16), return_hidden=True)
        _, full_hidden = model(prompt, return_hidden=True)
        step_logits, _, step_hidden = inv.decode(prompt[:, :1], cache, return_hidden=True)
        _, _, tree_hidden = model.score_tree(prompt[:, :3], np.tril(np.ones((3, 3), bool)), cache, return_hidden=True)
        return logits, hidden, full_hidden, step_logits, step_hidden, tree_hidden, model.head_logits(hidden)

    logits, hidden, full_hidden, step_logits, step_hidden, tree_hidden, relogits = calls(
        nnx.state(target), nnx.state(invariant))
    np.testing.assert_allclose(relogits, logits, atol=1e-5)
    np.testing.assert_allclose(full_hidden[0, :5], hidden[0, :5], atol=1e-5)
    np.testing.assert_allclose(step_hidden[:, 0], tree_hidden[:, 0], atol=1e-5)
    assert step_hidden.shape == (2, 1, target.config.d_model) and tree_hidden.shape == (2, 3, target.config.d_model)
    assert np.asarray(step_logits).shape == (2, 1, VOCAB)


# -- stochastic: distribution of whole sequences (the chi-square of test_spec_decoder.py) ------------


@pytest.mark.slow
def test_stochastic_matches_target_distribution():
    """Children sampled from the head's own distribution (multi-step speculative sampling)."""
    seed = int(np.random.default_rng(TEST_SEED).integers(2**31))
    target = Transformer(TransformerConfig.tiny(vocab_size=SMALL_VOCAB, max_len=32), rngs=nnx.Rngs(seed))
    head = FeatureHead(FeatureHeadConfig.for_target(target.config), rngs=nnx.Rngs(seed + 1))
    decoder = SpeculativeDecoder(target, FeatureDrafter(head, target), tree=ExpansionTree((2, 2)),
                                 verify="stochastic")
    pvalue, result = _sequence_pvalue(decoder, target)
    assert pvalue > 1e-4
    assert np.asarray(result.stats.accepted_histogram)[2:].sum() > 0


# -- training -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(TEST_SEED)
    docs = [rng.integers(1, VOCAB, int(n)) for n in rng.integers(5, 40, 24)]
    return pack_documents(docs, seq_len=16)


def test_training_steps_lower_the_loss_on_a_fixed_batch(models, rows):
    target, _ = models
    head = FeatureHead(FeatureHeadConfig.for_target(target.config), rngs=nnx.Rngs(3))
    batch = {"tokens": rows.tokens[:4], "segment_ids": rows.segment_ids[:4], "positions": rows.positions[:4]}
    cfg = TrainConfig(steps=20, batch_size=4, seq_len=16, learning_rate=3e-3, warmup_steps=0)
    loss_cfg = FeatureLossConfig(input_noise=0.05)
    head_def, head_params = nnx.split(head)
    target_def, target_params, target_rest = nnx.split(target, nnx.Param, ...)
    tx = make_optimizer(cfg)
    step = make_feature_train_step(head_def, target_def, loss_cfg, tx)
    opt_state, losses = tx.init(head_params), []
    for i in range(cfg.steps):
        head_params, opt_state, sums = step(head_params, opt_state, batch, target_params, target_rest,
                                            jax.random.key(i))
        losses.append(float(sums["loss"] / sums["count"]))
    assert losses[-1] < 0.7 * losses[0]
    # Both terms are counted over the positions whose next token is in the same document.
    assert float(sums["count"]) == float(np.sum((rows.segment_ids[:4, 1:] == rows.segment_ids[:4, :-1])
                                                & (rows.segment_ids[:4, 1:] != 0)))


def test_precomputed_features_give_the_same_loss(models, rows):
    """A batch's "hidden" (the target's features, computed once by target_features in padded
    batches) stands in for the target's forward: the same loss terms, batch by batch and in evaluation."""
    target, head = models
    features = target_features(target, rows, batch_size=5)  # the last batch is padded
    assert features.shape == (rows.num_rows, rows.seq_len, target.config.d_model)
    batch = {"tokens": rows.tokens[3:7], "segment_ids": rows.segment_ids[3:7], "positions": rows.positions[3:7]}
    cfg = FeatureLossConfig(token_weight=0.5)
    ran = feature_loss_sums(head, target, batch, cfg)
    read = feature_loss_sums(head, target, {**batch, "hidden": features[3:7]}, cfg)
    for k in ("loss", "feature", "token", "agree", "count"):
        np.testing.assert_allclose(float(read[k]), float(ran[k]), rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(list(evaluate_feature_head(head, target, rows, 4, features=features).values()),
                               list(evaluate_feature_head(head, target, rows, 4).values()), rtol=1e-5)


def _one_pass_loss_sums(head, target, batch, cfg):
    """EAGLE's one-pass loss as feature_loss_sums computed it before unroll_steps (no noise)."""
    tokens, segments, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
    _, hidden = target(tokens, segments, positions, return_hidden=True)
    logits = target.head_logits(hidden[:, 1:], mask_padding=False)
    predicted = head(hidden[:, :-1], target.embed_tokens(tokens[:, 1:]), segments[:, :-1], positions[:, :-1])
    mask = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    err = predicted.astype(jnp.float32) - hidden[:, 1:].astype(jnp.float32)
    smooth_l1 = optax.huber_loss(err, delta=1.0).mean(-1)
    log_q = jax.nn.log_softmax(target.head_logits(predicted, mask_padding=False), -1)
    cross_entropy = -jnp.sum(jax.nn.softmax(logits, -1) * log_q, -1)
    agree = jnp.argmax(log_q, -1) == jnp.argmax(logits, -1)
    feature = jnp.sum(jnp.where(mask, smooth_l1, 0.0))
    token = jnp.sum(jnp.where(mask, cross_entropy, 0.0))
    return {"loss": cfg.feature_weight * feature + cfg.token_weight * token, "feature": feature, "token": token,
            "agree": jnp.sum(mask & agree).astype(jnp.float32), "count": jnp.sum(mask).astype(jnp.float32)}


def test_one_unroll_step_is_the_one_pass_loss(models, rows):
    target, head = models
    batch = {"tokens": rows.tokens[:4], "segment_ids": rows.segment_ids[:4], "positions": rows.positions[:4]}
    cfg = FeatureLossConfig(token_weight=0.5, unroll_steps=1, unroll_weight=0.3)
    got, want = feature_loss_sums(head, target, batch, cfg), _one_pass_loss_sums(head, target, batch, cfg)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_unrolled_pass_reads_predictions_within_each_document(models):
    """unroll_steps=2 adds a positive second-pass term with finite gradients; a row of two packed
    documents sums to the documents run alone (the second pass neither grades the position after
    the boundary, whose fed-back prediction is of the other document, nor lets one document's
    predictions into the other's attention)."""
    target, head = models
    rng = np.random.default_rng(TEST_SEED + 1)
    a, b, t = rng.integers(1, VOCAB, 7), rng.integers(1, VOCAB, 9), 16

    def row(docs):  # packed docs, padded to t: (tokens, segment_ids, positions)
        tokens = np.concatenate(docs + [np.zeros(t - sum(map(len, docs)), int)])
        segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)]
                                  + [np.zeros(t - sum(map(len, docs)), int)])
        positions = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(t - sum(map(len, docs)), int)])
        return tokens, segments, positions

    def batch(*rows_):
        return {k: jnp.asarray(np.stack(v), jnp.int32) for k, v in zip(("tokens", "segment_ids", "positions"),
                                                                       zip(*rows_))}

    sums = nnx.jit(feature_loss_sums, static_argnames="loss_cfg")  # jitted: op by op is slower on CPU
    cfg = FeatureLossConfig(token_weight=0.5, unroll_steps=2, unroll_weight=0.5)
    packed = sums(head, target, batch(row([a, b])), loss_cfg=cfg)
    alone = sums(head, target, batch(row([a]), row([b])), loss_cfg=cfg)
    for k in packed:
        np.testing.assert_allclose(float(packed[k]), float(alone[k]), rtol=1e-5, err_msg=k)
    # Pass 1 grades 6 + 8 positions; pass 2 drops each document's first (it reads no prediction).
    assert float(packed["count"]) == 6 + 8 and float(packed["count_k"]) == 5 + 7
    one = sums(head, target, batch(row([a, b])), loss_cfg=FeatureLossConfig(token_weight=0.5))
    assert float(packed["loss"]) > float(one["loss"])
    for k in ("feature", "token", "agree", "count"):
        assert float(packed[k]) == pytest.approx(float(one[k]), rel=1e-6), k
    cfg = FeatureLossConfig(input_noise=0.05, unroll_steps=3, unroll_gradient=True)
    grads = jax.tree.leaves(nnx.jit(nnx.grad(
        lambda h: feature_loss_sums(h, target, batch(row([a, b])), cfg, jax.random.key(0))["loss"]))(head))
    assert grads and all(bool(jnp.all(jnp.isfinite(g))) for g in grads) and any(bool(jnp.any(g != 0)) for g in grads)


def test_time_budget_plans_the_steps(models, rows, tmp_path):
    """With time_budget the step count comes from timed probe steps and bounds the schedule; the run
    trains on precomputed features, logs through on_log and saves its last step."""
    target, _ = models
    features = target_features(target, rows, batch_size=8)
    cfg = TrainConfig(steps=40, batch_size=2, seq_len=16, learning_rate=3e-3, warmup_steps=30, log_every=5,
                      eval_every=40, eval_batches=1, checkpoint_every=40)
    logs = []
    summary = train_feature_head(target, rows, tmp_path, train_cfg=cfg, val_rows=rows, train_features=features,
                                 val_features=features, time_budget=120.0, show_progress=False, on_log=logs.append)
    assert logs[0]["planned_steps"] == summary["planned_steps"] == summary["step"]
    assert 2 <= summary["step"] <= cfg.steps and summary["checkpoint"].endswith(f"step_{summary['step']:08d}")
    assert 0 <= summary["val_agree"] <= 1 and any("val_loss" in r for r in logs)
    with pytest.raises(ValueError, match="train_features"):
        train_feature_head(target, rows, tmp_path, train_cfg=cfg, train_features=features[:3], show_progress=False)


def test_distill_script_packs_held_out_prompts_apart():
    from benchmarks import distill_on_gpu as distill
    records = [{"prompt_index": i % 4, "response_ids": [7, 8, 9], "stopped": i % 2 == 0} for i in range(8)]
    train, val = distill.pack(records, [[1], [1, 2], [1, 2, 3], [4]], eos=2, seq_len=8, val_every=3)
    # Prompts 0 and 3 are held out: answers 0, 3, 4, 7; the even ones ended by eos get it back.
    assert int((val.segment_ids > 0).sum()) == (1 + 3 + 1) + (1 + 3) + (1 + 3 + 1) + (1 + 3)
    assert int((train.segment_ids > 0).sum()) == (2 + 3) + (3 + 3 + 1) + (2 + 3 + 1) + (3 + 3)
    with pytest.raises(ValueError, match="held-out"):
        distill.pack([r for r in records if r["prompt_index"]], [[1]] * 4, eos=2, seq_len=8, val_every=100)
    with pytest.raises(SystemExit):
        distill.parse_args(["--out", "x", "--deadline", "100", "--eval-seconds", "90"])
    assert distill.parse_args(["--out", "x", "--smoke"]).max_steps == distill.SMOKE["max_steps"]
    with pytest.raises(SystemExit):
        distill.parse_args(["--out", "x", "--unroll-steps", "0"])
    assert distill.loss_config(distill.parse_args(["--out", "x", "--unroll-steps", "2"])).unroll_steps == 2
    with pytest.raises(SystemExit):  # a read corpus answers its own prompts only
        distill.parse_args(["--out", "x", "--corpus", "c.jsonl", "--self-prompts", "5"])


def test_distill_script_reads_a_corpus_in_gzipped_parts(tmp_path):
    import gzip
    import json

    from benchmarks import distill_on_gpu as distill
    records = [{"prompt_index": i, "response_ids": list(range(i + 1)), "stopped": bool(i % 2), "temperature": 0.7}
               for i in range(50)]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    parts = [tmp_path / "c.gz.part-a", tmp_path / "c.gz.part-b"]
    parts[0].write_bytes(data[:100])
    parts[1].write_bytes(data[100:])
    assert distill.read_corpus([str(p) for p in parts]) == records
    plain = tmp_path / "c.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records[:3]) + "\n")
    assert distill.read_corpus([str(plain)]) == records[:3]
    plain.write_text(json.dumps({"text": "no answer ids"}) + "\n")
    with pytest.raises(ValueError, match="not a distill corpus"):
        distill.read_corpus([str(plain)])


def test_save_load_round_trip(models, tmp_path, monkeypatch):
    target, trained = models
    save_feature_head(trained, tmp_path / "f32", step=3, metadata={"teacher": "tiny"})
    head = load_feature_head(tmp_path / "f32")
    assert ckpt.config_to_dict(head.config) == ckpt.config_to_dict(trained.config)
    assert ckpt.read_metadata(ckpt.resolve_checkpoint(tmp_path / "f32"))["teacher"] == "tiny"
    for a, b in zip(jax.tree.leaves(nnx.state(trained, nnx.Param)), jax.tree.leaves(nnx.state(head, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # bfloat16 for shipping: the same values, rounded, under a bf16 config.
    path = save_feature_head(head, tmp_path / "bf16", step=3, dtype=jnp.bfloat16)
    small = load_feature_head(path)
    assert jnp.dtype(read_feature_head_config(path).layer.param_dtype) == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(nnx.state(head, nnx.Param)), jax.tree.leaves(nnx.state(small, nnx.Param))):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    # A relative path reads too (orbax itself takes absolute ones only), cast back to float32.
    monkeypatch.chdir(tmp_path)
    assert load_feature_head("bf16", dtype=jnp.float32).fc.kernel.dtype == jnp.float32


def test_misuse_raises(models, tmp_path):
    target, head = models
    with pytest.raises(ValueError, match="d_model"):
        FeatureDrafter(head, Transformer(target.config.replace(d_model=48), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="num_layers"):
        FeatureHeadConfig(layer=target.config)
    with pytest.raises(ValueError, match="token_weight"):
        FeatureLossConfig(token_weight=-1.0)
    with pytest.raises(ValueError, match="unroll_steps=0"):
        FeatureLossConfig(unroll_steps=0)
    with pytest.raises(ValueError, match="unroll_steps=2.0"):
        FeatureLossConfig(unroll_steps=2.0)
    with pytest.raises(ValueError, match="unroll_weight=0"):
        FeatureLossConfig(unroll_weight=0)
    with pytest.raises(ValueError, match="head must be"):
        FeatureDrafter(target, target)
    ckpt.save_checkpoint(tmp_path, 1, {"params": nnx.state(target, nnx.Param)},
                         {"model_config": target.config})
    with pytest.raises(ValueError, match="not a feature head checkpoint"):
        load_feature_head(tmp_path)
    save_feature_head(head, tmp_path / "head")
    assert is_feature_head(tmp_path / "head") and not is_feature_head(tmp_path)
    assert not is_feature_head(tmp_path / "missing")


def test_train_script_feature_head(tmp_path):
    """examples/train.py --draft-kind feature trains a head for a teacher (here stopped by the clock
    after its first step: the evaluation and the save of the last step still run) and saves it loadable."""
    from fa2jax.training import cli
    from fa2jax.training.command import main
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 4)
    teacher = os.path.join(os.path.dirname(__file__), "..", "examples", "checkpoints", "target")
    base = ["--draft-kind", "feature", "--teacher", teacher, "--data", str(corpus), "--steps", "4",
            "--warmup-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1",
            "--no-progress", "--out", str(tmp_path / "head")]
    summary = main(base + ["--save-dtype", "bfloat16", "--d-ff", "96", "--stop-after-minutes", "1e-9",
                           "--unroll-steps", "2", "--unroll-weight", "0.5"])
    assert summary["step"] == 1 and 0 <= summary["val_agree"] <= 1 and summary["checkpoint"].endswith("step_00000001")
    assert 0 <= summary["agree_k"] <= 1 and 0 <= summary["val_agree_k"] <= 1  # the depth-2 agreement, logged
    head = load_feature_head(tmp_path / "head")
    assert head.config.layer.d_ff == 96 and head.fc.kernel.dtype == jnp.bfloat16
    assert head.config.vocab_size == FeatureHeadConfig.for_target(ckpt.read_model_config(teacher)).vocab_size
    with pytest.raises(cli.UsageError, match="needs --teacher"):
        main([a for a in base if a != teacher and a != "--teacher"])
    with pytest.raises(cli.UsageError, match="--d-model"):
        main(base + ["--d-model", "64"])
    with pytest.raises(cli.UsageError, match="token_weight"):
        main(base + ["--token-weight", "-1"])
    with pytest.raises(cli.UsageError, match="unroll_weight"):
        main(base + ["--unroll-weight", "0"])
    with pytest.raises(cli.UsageError, match="--feature-layers: .*99"):  # refused before any data is read
        main(base[:-2] + ["--data", str(tmp_path / "missing"), "--feature-layers", "99", "--out", str(tmp_path / "x")])
    # A feature-head flag on a model run would do nothing: refused, naming it.
    model_run = ["--draft-kind" if a == "--draft-kind" else "model" if a == "feature" else a for a in base]
    with pytest.raises(cli.UsageError, match=r"\['--unroll-steps', '--feature-layers'\] only apply"):
        main(model_run + ["--unroll-steps", "2", "--feature-layers", "eagle3"])
