"""Fused projections (`fa2jax.fuse_projections`) compute the model's function in fewer kernels; the
kernel census counts them; the KV cache keeps one buffer per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fa2jax import KVCache, MultiHeadAttention, Transformer, TransformerConfig, fuse_projections, unfuse_projections
from fa2jax.kernel_census import kernel_census
from spec import SpeculativeDecoder, generate_incremental

# Basis: in float32 a fused matmul sums the same 32 products per output as the separate ones, in
# another blocking; the logits (|x| < 1) then differ by a few float32 ulps, far below this.
ATOL = 1e-5
CONFIGS = {
    "llama": TransformerConfig.tiny(),
    # Every switch that adds a parameter to a fused projection or touches its outputs.
    "biases_qk_norm_post_norms": TransformerConfig.tiny(qkv_bias=True, mlp_bias=True, out_bias=True, qk_norm=True,
                                                        post_norms=True, mlp_activation="gelu_tanh"),
}


def _random_biases(model):
    """Nonzero biases (zeros would hide a bias concatenated in the wrong order)."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(7)
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype) if "bias" in jax.tree_util.keystr(path)
        else x, state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request):
    plain = _random_biases(Transformer(CONFIGS[request.param], rngs=nnx.Rngs(0)))
    return plain, fuse_projections(plain)


def test_fused_layout(models):
    plain, fused = models
    c = plain.config
    assert fused.config == c.replace(fused_projections=True) and not c.fused_projections
    attn, mlp = fused.layers[0].attn, fused.layers[0].mlp
    assert attn.qkv.kernel.shape == (c.d_model, c.num_heads + 2 * c.num_kv_heads, c.head_dim)
    assert attn.query is None and attn.key is None and attn.value is None
    assert mlp.gate_up.kernel.shape == (c.d_model, 2 * c.d_ff) and mlp.gate is None and mlp.up is None
    # Parameters outside the projections are the same arrays, not copies.
    assert fused.embed.embedding[...] is plain.embed.embedding[...]
    assert fused.layers[1].attn.out.kernel[...] is plain.layers[1].attn.out.kernel[...]
    assert fuse_projections(fused) is fused and unfuse_projections(plain) is plain


def test_unfuse_restores_every_parameter(models):
    plain, fused = models
    back = unfuse_projections(fused)
    assert back.config == plain.config
    expected, got = nnx.to_pure_dict(nnx.state(plain)), nnx.to_pure_dict(nnx.state(back))
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    jax.tree.map(np.testing.assert_array_equal, expected, got)


def _cached_calls(model, tokens, lengths):
    """prefill -> decode 3 tokens -> score a 4-node tree, and the plain forward, in one compiled program."""
    graphdef, params = nnx.split(model)
    mask = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        prefill_logits, cache = model.prefill(tokens, lengths, model.init_cache(2, 32))
        decode_logits, cache = model.decode(tokens[:, :3], cache)
        tree_logits, cache = model.score_tree(tokens[:, 4:8], mask, cache)
        return prefill_logits, decode_logits, tree_logits, model(tokens), cache.keys, cache.values

    return run(params)


def test_fused_cached_calls_match(models):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)), jnp.int32)
    lengths = jnp.array([9, 5], jnp.int32)
    outputs = [_cached_calls(model, tokens, lengths) for model in models]
    for name, a, b in zip(("prefill", "decode", "score_tree", "forward", "keys", "values"), *outputs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, err_msg=name)


def test_generation_emits_the_same_greedy_tokens():
    plain = _random_biases(Transformer(CONFIGS["biases_qk_norm_post_norms"], rngs=nnx.Rngs(0)))
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 6)), jnp.int32)
    lengths = jnp.array([6, 3], jnp.int32)
    separate = generate_incremental(plain, prompt, lengths, max_new_tokens=8, fused=False)
    fused = generate_incremental(plain, prompt, lengths, max_new_tokens=8)  # fused inside the compiled loop
    np.testing.assert_array_equal(separate.tokens, fused.tokens)
    np.testing.assert_array_equal(separate.lengths, fused.lengths)
    # The speculative decoder fuses its target and draft by default and reproduces greedy decoding.
    draft = Transformer(plain.config.replace(num_layers=1), rngs=nnx.Rngs(3))
    decoder = SpeculativeDecoder(plain, draft, tree=(1, 2, 1))
    assert decoder._target_params["layers"][0]["attn"]["qkv"]["kernel"].shape[1] == (
        plain.config.num_heads + 2 * plain.config.num_kv_heads)
    speculative = decoder.generate(prompt, lengths, max_new_tokens=8)
    np.testing.assert_array_equal(separate.tokens, speculative.tokens)


def _decode_step_census(model):
    graphdef, params = nnx.split(model)
    cache = model.init_cache(1, 16)

    def step(params, cache, tokens):
        logits, cache = nnx.merge(graphdef, params).decode(tokens, cache)
        return jnp.argmax(logits[:, -1], -1), cache

    text = jax.jit(step).lower(params, cache, jnp.ones((1, 1), jnp.int32)).compile().as_text()
    return kernel_census(text)


def test_fused_decode_step_launches_fewer_matmuls():
    plain = Transformer(TransformerConfig.tiny(), rngs=nnx.Rngs(0))
    separate, fused = _decode_step_census(plain), _decode_step_census(fuse_projections(plain))
    # Per layer, one Q/K/V matmul instead of three and one gate/up matmul instead of two.
    assert fused.matmuls == separate.matmuls - 3 * plain.config.num_layers, (separate, fused)
    assert fused.total < separate.total


def test_kernel_census_counts_fusions_matmuls_and_loop_bodies():
    def two_products(a, b, c):
        return jnp.sin(a @ b), a @ c

    x = jnp.ones((64, 64))
    census = kernel_census(jax.jit(two_products).lower(x, x, x).compile().as_text())
    assert census.matmuls == 2 and census.total >= 2
    assert census.total == sum(n for _, n in census.by_opcode) == sum(n for _, n in census.by_name)

    def loop(x):
        return jax.lax.fori_loop(0, 5, lambda i, y: jnp.tanh(y @ y), x)

    text = jax.jit(loop).lower(x).compile().as_text()
    body = kernel_census(text, scope="loop")
    assert body.matmuls == 1 and body.total < kernel_census(text).total + 1
    with pytest.raises(ValueError, match="while loop"):
        kernel_census(jax.jit(two_products).lower(x, x, x).compile().as_text(), scope="loop")
    with pytest.raises(ValueError, match="scope"):
        kernel_census(text, scope="step")
    with pytest.raises(ValueError, match="ENTRY"):
        kernel_census("not hlo")


def test_cache_holds_one_buffer_per_layer():
    cache = KVCache.create(num_layers=3, batch=2, max_len=8, num_kv_heads=1, head_dim=4, dtype=jnp.bfloat16)
    assert cache.num_layers == 3 and len(cache.layer_values) == 3
    assert cache.layer_keys[0].shape == (2, 8, 1, 4) and cache.keys.shape == (3, 2, 8, 1, 4)
    written = cache.write(1, jnp.ones((2, 2, 1, 4)), -jnp.ones((2, 2, 1, 4)), jnp.array([0, 5], jnp.int32))
    assert float(written.layer_keys[0].sum()) == 0 and float(written.layer_keys[2].sum()) == 0
    np.testing.assert_array_equal(written.keys[1, :, :, 0, 0], [[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 0]])
    restacked = KVCache.from_stacked(written.keys, written.values, written.lengths)
    np.testing.assert_array_equal(restacked.values, written.values)
    with pytest.raises(ValueError, match="lengths"):
        KVCache.from_stacked(written.keys, written.values, jnp.zeros((3,), jnp.int32))


def test_fused_misuse_raises():
    with pytest.raises(ValueError, match="fused_projections"):
        TransformerConfig.tiny(fused_projections=1)
    with pytest.raises(ValueError, match="in_kv_features"):
        MultiHeadAttention(2, 8, num_kv_heads=1, in_kv_features=4, fused_qkv=True, rngs=nnx.Rngs(0))
    layer = MultiHeadAttention(2, 8, num_kv_heads=1, fused_qkv=True, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 3, 8))
    assert layer(x).shape == (1, 3, 8)
    with pytest.raises(ValueError, match="self-attention"):
        layer(x, jnp.ones((1, 5, 8)))
    with pytest.raises(TypeError, match="Transformer"):
        fuse_projections(layer)
    with pytest.raises(TypeError, match="fused"):
        generate_incremental(Transformer(TransformerConfig.tiny(), rngs=nnx.Rngs(0)), jnp.ones((1, 2), jnp.int32),
                             jnp.array([2]), max_new_tokens=2, fused="yes")
