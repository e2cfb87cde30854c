"""Transformer and KVCache: every cached call agrees with the plain forward over the same tokens."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fa2jax import KVCache, Transformer, TransformerConfig

# f32 at HIGHEST precision (conftest): cached and uncached paths differ only in summation order.
ATOL = 2e-5
MAX_LEN = 24


# The full suite runs on the XLA path; the interpreted Pallas kernels (slow on CPU) are compared with it
# in the tests marked below.
IMPLS = ["xla"]


class JittedModel:
    """The model's calls under nnx.jit, so each test compiles a handful of programs, not every op."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self._forward = nnx.jit(Transformer.__call__)
        self._prefill = nnx.jit(Transformer.prefill)
        self._decode = nnx.jit(Transformer.decode)
        self._score = nnx.jit(Transformer.score_tree)

    def __call__(self, tokens, segment_ids=None, positions=None):
        return self._forward(self.model, tokens, segment_ids, positions)

    def init_cache(self, batch, max_len):
        return self.model.init_cache(batch, max_len)

    def prefill(self, tokens, lengths, cache):
        return self._prefill(self.model, tokens, lengths, cache)

    def decode(self, tokens, cache):
        return self._decode(self.model, tokens, cache)

    def score_tree(self, tokens, tree_mask, cache):
        return self._score(self.model, tokens, tree_mask, cache)


@pytest.fixture(scope="module", params=IMPLS)
def model(request):
    config = TransformerConfig.tiny(attention_impl=request.param)
    return JittedModel(Transformer(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def tokens(model):
    return jax.random.randint(jax.random.key(1), (2, 12), 0, model.config.vocab_size, dtype=jnp.int32)


def _row_logits(model, row_tokens):
    """Plain forward over one unpadded row: [T] -> [T, V].

    The row is right-padded to MAX_LEN so that every call shares one compiled program: causal
    attention keeps the padding from changing the logits of the real tokens.
    """
    row_tokens = jnp.asarray(row_tokens, jnp.int32)
    padded = jnp.zeros((1, MAX_LEN), jnp.int32).at[0, :row_tokens.shape[0]].set(row_tokens)
    return model(padded)[0, :row_tokens.shape[0]]


def test_config_checks():
    with pytest.raises(ValueError, match="num_kv_heads"):
        TransformerConfig.tiny(num_kv_heads=3)
    with pytest.raises(ValueError, match="attention_impl"):
        TransformerConfig.tiny(attention_impl="flash")
    with pytest.raises(ValueError, match="invariant_rows"):
        TransformerConfig.tiny(invariant_rows=-1)
    with pytest.raises(ValueError, match="head_dim"):
        TransformerConfig.tiny(head_dim=7)
    config = TransformerConfig.tiny(vocab_size=100)
    assert config.vocab_size == 100 and hash(config) == hash(TransformerConfig.tiny(vocab_size=100))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 3
    for preset in (TransformerConfig.draft_20m(), TransformerConfig.target_1b()):
        assert preset.num_heads % preset.num_kv_heads == 0


def test_preset_sizes():
    def count(config):
        model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    assert 18e6 < count(TransformerConfig.draft_20m()) < 25e6
    assert 0.9e9 < count(TransformerConfig.target_1b()) < 1.3e9


def test_forward_shapes(model, tokens):
    logits = model(tokens)
    assert logits.shape == (2, 12, model.config.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_forward_is_causal(model, tokens):
    changed = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % model.config.vocab_size)
    np.testing.assert_allclose(model(tokens)[:, :8], model(changed)[:, :8], atol=ATOL)


def test_packed_segments_equal_separate_rows(model, tokens):
    # Row 0 packs tokens[0, :5] and tokens[1, :7]; positions restart at each segment by default.
    packed = jnp.concatenate([tokens[0, :5], tokens[1, :7]])[None]
    segment_ids = jnp.array([[1] * 5 + [2] * 7], jnp.int32)
    logits = model(packed, segment_ids=segment_ids)[0]
    np.testing.assert_allclose(logits[:5], _row_logits(model, tokens[0, :5]), atol=ATOL)
    np.testing.assert_allclose(logits[5:], _row_logits(model, tokens[1, :7]), atol=ATOL)


def test_prefill_then_decode_equal_forward(model, tokens):
    lengths = jnp.array([7, 4], jnp.int32)
    prompts = jnp.where(jnp.arange(12)[None] < lengths[:, None], tokens, 0)  # right-padded
    cache = model.init_cache(2, MAX_LEN)
    logits, cache = model.prefill(prompts, lengths, cache)
    np.testing.assert_array_equal(cache.lengths, lengths)
    for b in range(2):
        np.testing.assert_allclose(logits[b, :lengths[b]], _row_logits(model, tokens[b, :lengths[b]]), atol=ATOL)

    # Two decode calls (T = 2 then T = 1) continue each row with its own next tokens.
    steps = [jnp.stack([tokens[0, 7:9], tokens[1, 4:6]]), jnp.stack([tokens[0, 9:10], tokens[1, 6:7]])]
    for step in steps:
        logits, cache = model.decode(step, cache)
    np.testing.assert_array_equal(cache.lengths, lengths + 3)
    for b in range(2):
        expected = _row_logits(model, tokens[b, :lengths[b] + 3])[-1]
        np.testing.assert_allclose(logits[b, -1], expected, atol=ATOL)


# A tree of 6 nodes, parents before children: 0 -> {1, 2}, 1 -> {3, 5}, 2 -> {4}.
PARENTS = (-1, 0, 0, 1, 2, 1)


def _tree_mask(parents):
    n = len(parents)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return jnp.asarray(mask)


def _path(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def _prefilled(model, tokens, lengths):
    prompts = jnp.where(jnp.arange(tokens.shape[1])[None] < lengths[:, None], tokens, 0)
    return model.prefill(prompts, lengths, model.init_cache(tokens.shape[0], MAX_LEN))[1]


@pytest.mark.parametrize("per_row_mask", [False, True])
def test_score_tree_equals_each_path(model, tokens, per_row_mask):
    lengths = jnp.array([5, 3], jnp.int32)
    cache = _prefilled(model, tokens, lengths)
    mask = _tree_mask(PARENTS)
    nodes = jax.random.randint(jax.random.key(2), (2, len(PARENTS)), 0, model.config.vocab_size, dtype=jnp.int32)
    if per_row_mask:
        # Row 1 gets a chain instead, to check that each row reads its own mask.
        masks = jnp.stack([mask, _tree_mask(tuple(range(-1, len(PARENTS) - 1)))])
        parents = [PARENTS, tuple(range(-1, len(PARENTS) - 1))]
    else:
        masks, parents = mask, [PARENTS, PARENTS]
    logits, new_cache = model.score_tree(nodes, masks, cache)
    np.testing.assert_array_equal(new_cache.lengths, lengths)
    for b in range(2):
        for i in range(len(PARENTS)):
            path_tokens = nodes[b, jnp.array(_path(parents[b], i))]
            row = jnp.concatenate([tokens[b, :lengths[b]], path_tokens])
            np.testing.assert_allclose(logits[b, i], _row_logits(model, row)[-1], atol=ATOL,
                                       err_msg=f"row {b} node {i}")


def test_verify_tree_is_a_deprecated_alias(tokens):
    """The old name warns once per process and returns what score_tree returns."""
    import warnings

    from fa2jax._deprecation import warn_renamed

    plain = Transformer(TransformerConfig.tiny(attention_impl="xla"), rngs=nnx.Rngs(0))
    cache = _prefilled(plain, tokens, jnp.array([5, 3], jnp.int32))
    nodes, mask = tokens[:, :len(PARENTS)], _tree_mask(PARENTS)
    warn_renamed.cache_clear()
    with pytest.warns(DeprecationWarning, match="Transformer.score_tree"):
        old = plain.verify_tree(nodes, mask, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.verify_tree(nodes, mask, cache)  # once only
    new = plain.score_tree(nodes, mask, cache)
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
        np.testing.assert_array_equal(a, b)


def test_renamed_public_names_warn_and_still_work():
    import fa2jax
    import fa2jax.tokenizer
    import fa2jax.training
    from fa2jax._deprecation import warn_renamed

    warn_renamed.cache_clear()
    for module, old, new in ((fa2jax, "RopeScaling", "RopeScalingConfig"),
                             (fa2jax.training, "Preset", "RunConfig"),
                             (fa2jax.tokenizer, "load_tokenizer", "read_tokenizer_file")):
        with pytest.warns(DeprecationWarning, match=new):
            assert getattr(module, old) is getattr(module, new)
    with pytest.raises(AttributeError, match="no_such_name"):
        fa2jax.no_such_name  # noqa: B018


def test_accept_then_decode_equals_forward(model, tokens):
    lengths = jnp.array([5, 3], jnp.int32)
    cache = _prefilled(model, tokens, lengths)
    nodes = jax.random.randint(jax.random.key(3), (2, len(PARENTS)), 0, model.config.vocab_size, dtype=jnp.int32)
    _, cache = model.score_tree(nodes, _tree_mask(PARENTS), cache)
    # Row 0 accepts 0 -> 1 -> 5, row 1 only the root; unaccepted path entries are ignored.
    path_indices = jnp.array([[0, 1, 5], [0, 2, 4]], jnp.int32)
    num_accepted = jnp.array([3, 1], jnp.int32)
    cache = cache.accept(path_indices, num_accepted)
    np.testing.assert_array_equal(cache.lengths, lengths + num_accepted)
    nxt = jnp.array([[7], [9]], jnp.int32)
    logits, _ = model.decode(nxt, cache)
    for b in range(2):
        accepted = nodes[b, path_indices[b, :num_accepted[b]]]
        row = jnp.concatenate([tokens[b, :lengths[b]], accepted, nxt[b]])
        np.testing.assert_allclose(logits[b, 0], _row_logits(model, row)[-1], atol=ATOL)


def test_bfloat16_cached_calls_follow_forward(tokens):
    model = JittedModel(Transformer(TransformerConfig.tiny(dtype=jnp.bfloat16), rngs=nnx.Rngs(0)))
    lengths = jnp.array([7, 4], jnp.int32)
    cache = model.init_cache(2, MAX_LEN)
    assert cache.keys.dtype == jnp.bfloat16
    logits, cache = model.prefill(tokens, lengths, cache)
    logits, cache = model.decode(jnp.stack([tokens[0, 7:8], tokens[1, 4:5]]), cache)
    assert logits.dtype == jnp.float32
    for b, n in enumerate((8, 5)):
        # Basis: the whole bf16 forward differs from the f32 one by < 1e-2 on these logits (|x| < 0.5),
        # so a cached path may differ from the uncached one by no more than that.
        np.testing.assert_allclose(logits[b, 0], _row_logits(model, tokens[b, :n])[-1], atol=1e-2)


def _check_invariant_rows(config, tokens, rows=6, nodes=5):
    """With invariant_rows, a token decoded alone and the same token verified as a chain node run
    the same shapes and the same attention walk, so their logits agree bit for bit; and padding to R
    rows costs no accuracy."""
    plain = JittedModel(Transformer(config, rngs=nnx.Rngs(0)))
    invariant = JittedModel(Transformer(config.replace(invariant_rows=rows), rngs=nnx.Rngs(0)))
    lengths = jnp.array([7, 4], jnp.int32)
    chain = np.tril(np.ones((nodes, nodes), bool))
    _, start = invariant.prefill(tokens, lengths, invariant.init_cache(2, MAX_LEN))
    new = jnp.stack([tokens[0, 7:7 + nodes], tokens[1, 4:4 + nodes]])  # [2, nodes]
    verified, _ = invariant.score_tree(new, chain, start)
    cache = start
    for t in range(nodes):
        decoded, cache = invariant.decode(new[:, t:t + 1], cache)
        np.testing.assert_array_equal(np.asarray(decoded[:, 0]), np.asarray(verified[:, t]), err_msg=f"{t=}")
    # Padding must cost no accuracy: against the float32 model, the invariant model's error stays
    # within twice the plain bf16 model's (the suite's tolerance rule).
    reference_model = JittedModel(Transformer(config.replace(dtype=jnp.float32), rngs=nnx.Rngs(0)))
    logits_of = {}
    for name, model in (("plain", plain), ("f32", reference_model)):
        _, model_start = model.prefill(tokens, lengths, model.init_cache(2, MAX_LEN))
        logits_of[name] = model.score_tree(new, chain, model_start)[0]
    reference = logits_of["f32"]
    plain_error = float(jnp.max(jnp.abs(logits_of["plain"] - reference)))
    assert float(jnp.max(jnp.abs(verified - reference))) <= 2 * plain_error + 1e-3
    with pytest.raises(ValueError, match="invariant_rows"):
        invariant.score_tree(jnp.zeros((2, rows + 1), jnp.int32), np.tril(np.ones((rows + 1,) * 2, bool)), start)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_invariant_rows_decode_equals_chain_verify_bitwise(tokens, impl):
    _check_invariant_rows(TransformerConfig.tiny(attention_impl=impl, dtype=jnp.bfloat16), tokens)


@pytest.mark.gpu
def test_invariant_rows_bitwise_on_gpu(tokens):
    """The same on a GPU (run with JAX_PLATFORMS=cuda, `make test-gpu`), where cuBLAS/Triton matmuls
    choose their algorithm by row count: wide enough layers that the choice is real."""
    config = TransformerConfig.tiny(attention_impl="pallas", dtype=jnp.bfloat16, d_model=512, num_heads=8,
                                    num_kv_heads=2, head_dim=64, d_ff=1536)
    _check_invariant_rows(config, tokens, rows=9, nodes=5)


def test_accept_moves_slots():
    slots = jnp.arange(10, dtype=jnp.float32)[None, None, :, None, None]
    filled = jnp.broadcast_to(slots, (2, 2, 10, 1, 1))  # [L, B, S, K, D]: slot s holds s in every layer and row
    cache = KVCache.from_stacked(filled, -filled, jnp.array([2, 4], jnp.int32))
    moved = cache.accept(jnp.array([[0, 2, 3], [0, 1, 2]], jnp.int32), jnp.array([3, 0], jnp.int32))
    np.testing.assert_array_equal(moved.lengths, [5, 4])
    np.testing.assert_array_equal(moved.keys[1, 0, :, 0, 0], [0, 1, 2, 4, 5, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(moved.values[0, 1, :, 0, 0], -np.arange(10))


def test_jit_loop_compiles_once(model, tokens):
    """The serving pattern: split once, then pure jitted steps with lengths as data."""
    jitted, model = model, model.model
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, cache, token):
        logits, cache = nnx.merge(graphdef, state).decode(token, cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], cache

    @jax.jit
    def prefill(state, prompts, lengths):
        m = nnx.merge(graphdef, state)
        return m.prefill(prompts, lengths, m.init_cache(2, MAX_LEN))

    def greedy(lengths, steps=3):
        prompts = jnp.where(jnp.arange(12)[None] < lengths[:, None], tokens, 0)
        logits, cache = prefill(state, prompts, lengths)
        token = jnp.argmax(logits[jnp.arange(2), lengths - 1], axis=-1).astype(jnp.int32)[:, None]
        out = [token]
        for _ in range(steps - 1):
            token, cache = step(state, cache, token)
            out.append(token)
        return jnp.concatenate(out, axis=1)

    for lengths in ([6, 3], [2, 9]):
        lengths = jnp.array(lengths, jnp.int32)
        generated = greedy(lengths)
        for b in range(2):
            row = list(np.asarray(tokens[b, :lengths[b]]))
            for _ in range(3):
                row.append(int(jnp.argmax(_row_logits(jitted, jnp.array(row))[-1])))
            np.testing.assert_array_equal(generated[b], row[-3:])
    assert step._cache_size() == 1 and prefill._cache_size() == 1


def test_bad_calls_raise(model, tokens):
    model = model.model
    cache = model.init_cache(2, 8)
    with pytest.raises(ValueError, match="longer than the cache"):
        model.prefill(tokens, jnp.array([3, 3]), cache)
    with pytest.raises(ValueError, match="tree_mask"):
        model.score_tree(tokens[:, :3], jnp.ones((4, 4), bool), cache)
    with pytest.raises(ValueError, match="tokens"):
        model(tokens.astype(jnp.float32))


def _cross_entropy(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_pallas_training_step_matches_xla():
    tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, 128, dtype=jnp.int32)
    segment_ids = jnp.array([[1] * 5 + [2] * 3, [1] * 8], jnp.int32)
    grads = {}
    for impl in ("pallas", "xla"):
        model = Transformer(TransformerConfig.tiny(attention_impl=impl), rngs=nnx.Rngs(0))
        step = nnx.jit(nnx.grad(lambda m: _cross_entropy(m(tokens, segment_ids), tokens)))
        grads[impl] = step(model)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads["pallas"]), nnx.to_flat_state(grads["xla"])):
        np.testing.assert_allclose(a[...], b[...], atol=1e-5, err_msg=str(path))


def test_pallas_cached_calls_match_xla(tokens):
    lengths = jnp.array([5, 3], jnp.int32)
    nodes = jax.random.randint(jax.random.key(5), (2, len(PARENTS)), 0, 128, dtype=jnp.int32)
    results = {}
    for impl in ("pallas", "xla"):
        model = JittedModel(Transformer(TransformerConfig.tiny(attention_impl=impl), rngs=nnx.Rngs(0)))
        prefill_logits, cache = model.prefill(tokens, lengths, model.init_cache(2, MAX_LEN))
        decode_logits, cache = model.decode(tokens[:, :2], cache)
        tree_logits, _ = model.score_tree(nodes, _tree_mask(PARENTS), cache)
        results[impl] = (prefill_logits, decode_logits, tree_logits)
    for name, a, b in zip(("prefill", "decode", "tree"), results["pallas"], results["xla"]):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)

