"""Fused target features (EAGLE-3): the target's `hidden_layers` outputs and a `FeatureHead` with
`feature_layers`, on tiny f32 models (CPU).

The wide hidden states are the inner layers' residual streams (checked against the blocks run by
hand) and agree across the model's calls; a fused head drafts losslessly (greedy, token for token),
its first level reads exactly `read_target` of the target's states, it trains on precomputed wide
features as on the target's own forward, and it saves and loads with its layers.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fa2jax import Transformer, TransformerConfig
from fa2jax import checkpoint as ckpt
from fa2jax.data import pack_documents
from fa2jax.feature_head import (
    FeatureHead, FeatureHeadConfig, count_params, load_feature_head, parse_feature_layers, save_feature_head,
    widen_head)
from fa2jax.model import with_invariant_rows
from fa2jax.training import TrainConfig
from fa2jax.training.feature_draft import (
    FeatureLossConfig, evaluate_feature_head, feature_loss_sums, target_features, train_feature_head)
from spec import DynamicTree, ExpansionTree, FeatureDrafter, SpeculativeDecoder, generate_incremental

TEST_SEED = int(os.environ.get("FA2JAX_TEST_SEED", "0"))
VOCAB = 48
LAYERS = (0, 1)  # of a 3-layer target: both inner layers


@pytest.fixture(scope="module")
def models():
    seed = int(np.random.default_rng(TEST_SEED).integers(2**31))
    target = Transformer(TransformerConfig.tiny(vocab_size=VOCAB, num_layers=3), rngs=nnx.Rngs(seed))
    head = FeatureHead(FeatureHeadConfig.for_target(target.config, feature_layers=LAYERS), rngs=nnx.Rngs(seed + 1))
    return target, head


def _prompts(lengths, width, seed=TEST_SEED):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, VOCAB, (len(lengths), width)), jnp.int32), jnp.asarray(lengths, jnp.int32)


def test_hidden_layers_are_the_inner_residual_streams_in_every_call(models):
    target, _ = models
    d = target.config.d_model
    prompt, lengths = _prompts([5, 3], 6)
    invariant = with_invariant_rows(target, 4)

    @jax.jit
    def calls(model_params, invariant_params):
        model = nnx.merge(nnx.split(target)[0], model_params)
        inv = nnx.merge(nnx.split(invariant)[0], invariant_params)
        _, plain = model(prompt, return_hidden=True)
        _, wide = model(prompt, return_hidden=True, hidden_layers=LAYERS)
        positions = jnp.broadcast_to(jnp.arange(6), prompt.shape)
        x0 = model.layers[0](model.embed_tokens(prompt), segment_ids=None, positions=positions)
        x1 = model.layers[1](x0, segment_ids=None, positions=positions)
        _, cache, pre = model.prefill(prompt, lengths, model.init_cache(2, 16), return_hidden=True,
                                      hidden_layers=LAYERS)
        _, _, step = inv.decode(prompt[:, :1], cache, return_hidden=True, hidden_layers=(1,))
        _, _, tree = model.score_tree(prompt[:, :3], np.tril(np.ones((3, 3), bool)), cache, return_hidden=True,
                                      hidden_layers=(1,))
        return plain, wide, x0, x1, pre, step, tree

    plain, wide, x0, x1, pre, step, tree = calls(nnx.state(target), nnx.state(invariant))
    assert wide.shape == (2, 6, 3 * d) and step.shape == (2, 1, 2 * d) and tree.shape == (2, 3, 2 * d)
    np.testing.assert_allclose(wide[..., :d], x0, atol=1e-5)
    np.testing.assert_allclose(wide[..., d:2 * d], x1, atol=1e-5)
    np.testing.assert_allclose(wide[..., 2 * d:], plain, atol=1e-5)
    np.testing.assert_allclose(pre[0, :5], wide[0, :5], atol=1e-5)  # row 0's prompt: 5 tokens
    np.testing.assert_allclose(step[:, 0], tree[:, 0], atol=1e-5)


@pytest.mark.parametrize("layers, call", [((2,), "call"), ((1, 0), "call"), ((0, 0), "prefill"), ((-1,), "decode"),
                                          ((0,), "no_hidden")])
def test_bad_hidden_layers_raise(models, layers, call):
    target, _ = models
    prompt, lengths = _prompts([2], 3)
    cache = target.init_cache(1, 8)
    with pytest.raises(ValueError, match="hidden_layers"):
        if call == "call":
            target(prompt, return_hidden=True, hidden_layers=layers)
        elif call == "prefill":
            target.prefill(prompt, lengths, cache, return_hidden=True, hidden_layers=layers)
        elif call == "decode":
            target.decode(prompt[:, :1], cache, return_hidden=True, hidden_layers=layers)
        else:
            target(prompt, hidden_layers=layers)


def test_fused_head_has_a_fuse_projection_and_reads_the_wide_states(models):
    target, head = models
    d = target.config.d_model
    plain = FeatureHead(FeatureHeadConfig.for_target(target.config), rngs=nnx.Rngs(0))
    assert count_params(head) == count_params(plain) + 3 * d * d and plain.fuse is None
    assert head.config.target_width == 3 * d
    wide = jax.random.normal(jax.random.key(TEST_SEED), (2, 4, 3 * d))
    # The inner parts are RMS-normalised before the projection (scaling one changes nothing); the
    # final state, normalised by the target already, is read as it is.
    np.testing.assert_allclose(head.read_target(wide.at[..., :d].multiply(50.0)), head.read_target(wide), atol=1e-4)
    assert not np.allclose(head.read_target(wide.at[..., d:2 * d].set(1.0)), head.read_target(wide), atol=1e-3)
    assert not np.allclose(head.read_target(wide.at[..., 2 * d:].multiply(2.0)), head.read_target(wide), atol=1e-3)
    np.testing.assert_array_equal(plain.read_target(wide[..., :d]), wide[..., :d])
    with pytest.raises(ValueError, match="target_width|width 96"):
        head.read_target(wide[..., :d])


@pytest.mark.parametrize("tree", [ExpansionTree.chain(4), DynamicTree(num_nodes=10, depth=4, top_k=3)],
                         ids=["chain", "dynamic"])
def test_fused_head_greedy_matches_incremental(models, tree):
    target, head = models
    prompt, lengths = _prompts([5, 2, 7], 7)
    baseline = generate_incremental(target, prompt, lengths, max_new_tokens=14)
    result = SpeculativeDecoder(target, FeatureDrafter(head, target), tree=tree).generate(prompt, lengths,
                                                                                         max_new_tokens=14)
    np.testing.assert_array_equal(np.asarray(result.tokens), np.asarray(baseline.tokens))
    np.testing.assert_array_equal(np.asarray(result.lengths), np.asarray(baseline.lengths))


def test_first_level_reads_the_fused_target_states(models):
    """The drafter's root input is `read_target` of the target's wide prefill states at the last
    prompt token, so the first proposal equals the head run by hand on them."""
    target, head = models
    drafter = FeatureDrafter(head, target)
    assert drafter.target_hidden_layers == LAYERS
    prompt, lengths = _prompts([4, 6], 6, seed=TEST_SEED + 1)
    _, _, wide = target.prefill(prompt, lengths, target.init_cache(2, 16), return_hidden=True, hidden_layers=LAYERS)
    state = drafter.init(drafter.params, prompt, lengths, committed=12, num_nodes=1, target_hidden=wide)
    last = wide[jnp.arange(2), lengths - 1]  # [B, 3d]
    np.testing.assert_allclose(state.feature, head.read_target(last), atol=1e-5)
    root = jnp.asarray([[3], [5]], jnp.int32)
    logits, _ = drafter.propose(drafter.params, state, root, np.ones((1, 1), bool))
    # By hand: the head over (fused f_i, x_{i+1}) of the whole prompt, then the root's row.
    for b in range(2):
        n = int(lengths[b])
        tokens = jnp.concatenate([prompt[b:b + 1, 1:n], root[b:b + 1]], axis=1)  # x_1..x_{n-1}, root
        out = head(head.read_target(wide[b:b + 1, :n]), target.embed_tokens(tokens))
        np.testing.assert_allclose(logits[b, 0], target.head_logits(out[:, -1:])[0, 0], atol=1e-4)


def test_drafters_must_agree_on_the_layers(models):
    target, head = models
    other = FeatureHead(FeatureHeadConfig.for_target(target.config, feature_layers=(1,)), rngs=nnx.Rngs(2))
    from spec import MergedTree
    with pytest.raises(ValueError, match="same inner layers"):
        SpeculativeDecoder(target, [FeatureDrafter(head, target), FeatureDrafter(other, target)],
                           tree=MergedTree((ExpansionTree((1,)), ExpansionTree((1,)))))


def test_precomputed_wide_features_give_the_same_loss(models):
    target, head = models
    rng = np.random.default_rng(TEST_SEED)
    rows = pack_documents([rng.integers(1, VOCAB, int(n)) for n in rng.integers(5, 30, 10)], seq_len=16)
    features = target_features(target, rows, batch_size=3, hidden_layers=LAYERS)
    assert features.shape == (rows.num_rows, 16, 3 * target.config.d_model)
    batch = {"tokens": rows.tokens[:3], "segment_ids": rows.segment_ids[:3], "positions": rows.positions[:3]}
    cfg = FeatureLossConfig(token_weight=0.5, unroll_steps=2)
    ran = feature_loss_sums(head, target, batch, cfg)
    read = feature_loss_sums(head, target, {**batch, "hidden": features[:3]}, cfg)
    for k in ran:
        np.testing.assert_allclose(float(read[k]), float(ran[k]), rtol=1e-5, err_msg=k)
    # Kept in host memory instead (for features too big for the device): the same values and metrics.
    host = target_features(target, rows, batch_size=3, hidden_layers=LAYERS, on_host=True)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, np.asarray(features))
    np.testing.assert_allclose(list(evaluate_feature_head(head, target, rows, 4, features=host).values()),
                               list(evaluate_feature_head(head, target, rows, 4, features=features).values()),
                               rtol=1e-6)
    grads = jax.tree.leaves(nnx.grad(lambda h: feature_loss_sums(h, target, batch, cfg)["loss"])(head))
    fuse_grad = nnx.grad(lambda h: feature_loss_sums(h, target, batch, cfg)["loss"])(head).fuse.kernel[...]
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads) and bool(jnp.any(fuse_grad != 0))


def test_save_load_keeps_the_layers(models, tmp_path):
    target, head = models
    save_feature_head(head, tmp_path, step=1, dtype=jnp.bfloat16)
    loaded = load_feature_head(tmp_path, dtype=jnp.float32)
    assert loaded.config.feature_layers == LAYERS and loaded.fuse is not None
    assert ckpt.config_to_dict(loaded.config)["feature_layers"] == list(LAYERS)
    np.testing.assert_allclose(loaded.fuse.kernel[...], head.fuse.kernel[...].astype(jnp.bfloat16).astype(jnp.float32))


def test_feature_layer_settings_are_checked(models):
    target, _ = models
    assert parse_feature_layers("", 30) == () and parse_feature_layers("eagle3", 30) == (1, 14, 26)
    assert parse_feature_layers("2, 14,26", 30) == (2, 14, 26)
    for text, match in (("29", "'29'"), ("3,2", "'3,2'"), ("low", "'low'"), ("eagle3", "at least 5")):
        with pytest.raises(ValueError, match=match):
            parse_feature_layers(text, 30 if text != "eagle3" else 4)
    with pytest.raises(ValueError, match="feature_layers"):
        FeatureHeadConfig.for_target(target.config, feature_layers=(1, 0))
    with pytest.raises(ValueError, match="num_layers=3"):
        FeatureHeadConfig.for_target(target.config, feature_layers=(2,))
    with pytest.raises(ValueError, match="num_layers=2"):
        small = Transformer(target.config.replace(num_layers=2), rngs=nnx.Rngs(0))
        FeatureDrafter(FeatureHead(FeatureHeadConfig.for_target(target.config, feature_layers=(1,)),
                                   rngs=nnx.Rngs(0)), small)


def test_widened_head_drafts_as_its_plain_source(models, tmp_path):
    """`widen_head` from a plain head: the fuse passes the final state through, so greedy decoding
    accepts exactly what the plain head's did; training from it (init_head) starts at its loss."""
    target, _ = models
    plain = FeatureHead(FeatureHeadConfig.for_target(target.config), rngs=nnx.Rngs(TEST_SEED + 5))
    wide = widen_head(plain, FeatureHeadConfig.for_target(target.config, feature_layers=LAYERS))
    prompt, lengths = _prompts([6, 3], 7, seed=TEST_SEED + 2)
    tree = DynamicTree(num_nodes=8, depth=4, top_k=3)
    runs = [SpeculativeDecoder(target, FeatureDrafter(h, target), tree=tree).generate(prompt, lengths,
                                                                                      max_new_tokens=12)
            for h in (plain, wide)]
    np.testing.assert_array_equal(np.asarray(runs[0].stats.accepted_histogram),
                                  np.asarray(runs[1].stats.accepted_histogram))
    rng = np.random.default_rng(TEST_SEED)
    rows = pack_documents([rng.integers(1, VOCAB, int(n)) for n in rng.integers(5, 30, 6)], seq_len=16)
    batch = {"tokens": rows.tokens[:2], "segment_ids": rows.segment_ids[:2], "positions": rows.positions[:2]}
    np.testing.assert_allclose(float(feature_loss_sums(wide, target, batch, FeatureLossConfig())["loss"]),
                               float(feature_loss_sums(plain, target, batch, FeatureLossConfig())["loss"]), rtol=1e-5)
    # Training from a head (init_head) donates the copies, not the source's arrays: it stays usable.
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, warmup_steps=0, eval_every=1, eval_batches=1,
                      checkpoint_every=1)
    train_feature_head(target, rows, tmp_path, train_cfg=cfg, show_progress=False, init_head=plain,
                       head_config=FeatureHeadConfig.for_target(target.config, feature_layers=LAYERS))
    assert np.isfinite(float(feature_loss_sums(plain, target, batch, FeatureLossConfig())["loss"]))
    with pytest.raises(ValueError, match="feature_layers"):
        widen_head(wide, FeatureHeadConfig.for_target(target.config, feature_layers=(1,)))
    with pytest.raises(ValueError, match="layer shapes"):
        widen_head(plain, FeatureHeadConfig.for_target(target.config, d_ff=16))
