"""fa2jax.dot_product_attention, the cache attentions, MultiHeadAttention and attention_fn.

Each implementation is checked against the f32/HIGHEST oracles of pallas_kernels; the layers are
checked against stock Flax layers holding the same parameters (outputs and gradients).
"""

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fa2jax
from pallas_kernels import attention_reference, tree_attention_reference

ATOL = 1e-5  # f32 with HIGHEST matmuls (conftest): differences are summation order only
# The "pallas" backend runs interpreted on CPU: it is tested on fewer, smaller cases.
IMPLEMENTATIONS = ["xla", "pallas"]


def _qkv(key, B=2, T=6, S=6, H=4, K=2, D=8, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(key), 3)
    return (jax.random.normal(kq, (B, T, H, D), dtype), jax.random.normal(kk, (B, S, K, D), dtype),
            jax.random.normal(kv, (B, S, K, D), dtype))


# (name, shapes, fa2jax kwargs, reference kwargs)
CASES = [
    ("plain", {}, {}, {}),
    ("causal_gqa_t_ne_s", dict(T=4, S=7), dict(is_causal=True), dict(causal=True)),
    ("window", dict(K=4), dict(local_window_size=(2, 1)), dict(window_size=(2, 1))),
    ("segments_softcap_mqa", dict(K=1), dict(segment_ids=jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 3, 3]]),
                                              softcap=2.0, is_causal=True),
     dict(segment_ids=jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 3, 3]]), softcap=2.0, causal=True)),
    ("mask", {}, dict(mask=jax.random.bernoulli(jax.random.key(9), 0.7, (2, 1, 6, 6))),
     dict(mask=jax.random.bernoulli(jax.random.key(9), 0.7, (2, 1, 6, 6)))),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name,shapes,kwargs,ref_kwargs", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(implementation, name, shapes, kwargs, ref_kwargs):
    q, k, v = _qkv(0, **shapes)
    # jit: one compile per case instead of one per op
    out = jax.jit(lambda q, k, v: fa2jax.dot_product_attention(
        q, k, v, implementation=implementation, **kwargs))(q, k, v)
    expected = jax.jit(lambda q, k, v: attention_reference(q, k, v, **ref_kwargs))(q, k, v)
    np.testing.assert_allclose(out, expected, atol=ATOL)


def test_xla_matches_jax_nn_with_bias_and_lengths():
    q, k, v = _qkv(1)
    bias = jax.random.normal(jax.random.key(2), (1, 4, 6, 6))
    lengths = jnp.array([6, 4], jnp.int32)
    ours = fa2jax.dot_product_attention(q, k, v, bias, is_causal=True, key_value_seq_lengths=lengths,
                                        implementation="xla")
    theirs = jax.nn.dot_product_attention(q, k, v, bias, is_causal=True, key_value_seq_lengths=lengths,
                                          implementation="xla")
    np.testing.assert_allclose(ours, theirs, atol=ATOL)


SEQ_LENGTH_CASES = {  # shapes, jax.nn keyword arguments; causal only with T == S (jax.nn aligns it top-left)
    "both-causal-gqa": (dict(T=7, S=7), dict(query_seq_lengths=jnp.array([7, 3], jnp.int32),
                                             key_value_seq_lengths=jnp.array([5, 6], jnp.int32), is_causal=True)),
    "queries-only-mqa": (dict(T=5, S=7, K=1), dict(query_seq_lengths=jnp.array([2, 5], jnp.int32))),
    "keys-only-t-ne-s": (dict(T=5, S=7), dict(key_value_seq_lengths=jnp.array([1, 6], jnp.int32))),
}


# Every case on xla; two on pallas, which runs interpreted on CPU.
@pytest.mark.parametrize("implementation,case", [("xla", c) for c in SEQ_LENGTH_CASES]
                         + [("pallas", "both-causal-gqa"), ("pallas", "queries-only-mqa")])
def test_seq_lengths_match_jax_nn(implementation, case):
    """query_seq_lengths / key_value_seq_lengths mean what they mean in jax.nn: outputs and
    gradients (jax.vjp, random cotangent) equal jax.nn.dot_product_attention(implementation="xla")."""
    shapes, kwargs = SEQ_LENGTH_CASES[case]
    q, k, v = _qkv(7, **shapes)
    do = jax.random.normal(jax.random.key(8), q.shape)

    def with_vjp(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out,) + vjp(do)

    ours = jax.jit(lambda: with_vjp(lambda q, k, v: fa2jax.dot_product_attention(
        q, k, v, implementation=implementation, **kwargs)))()
    theirs = jax.jit(lambda: with_vjp(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="xla", **kwargs)))()
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(a, b, atol=ATOL, err_msg=name)


def test_seq_lengths_are_checked():
    q, k, v = _qkv(9)
    with pytest.raises(ValueError, match="query_seq_lengths must be an integer"):
        fa2jax.dot_product_attention(q, k, v, query_seq_lengths=jnp.array([6]), implementation="xla")
    with pytest.raises(ValueError, match="key_value_seq_lengths must be an integer"):
        fa2jax.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([6.0, 2.0]), implementation="xla")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fully_masked_rows_are_zero_and_nan_does_not_leak(implementation):
    q, k, v = _qkv(3)
    k, v = k.at[1, 4:].set(jnp.nan), v.at[1, 4:].set(jnp.nan)  # keys past row 1's length hold NaN
    out = jax.jit(lambda q, k, v: fa2jax.dot_product_attention(
        q, k, v, query_seq_lengths=jnp.array([6, 3]), key_value_seq_lengths=jnp.array([6, 4]),
        implementation=implementation))(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(out[1, 3:], 0.0)


def test_dropout_is_deterministic_and_scaled():
    q, k, v = _qkv(4, T=16, S=16)
    jitted = jax.jit(lambda rng: fa2jax.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng,
                                                              implementation="xla"))

    def run(dropout_rng=None):
        if dropout_rng is None:
            return fa2jax.dot_product_attention(q, k, v, dropout_rate=0.5, implementation="xla")
        return jitted(dropout_rng)

    a, b = run(dropout_rng=jax.random.key(0)), run(dropout_rng=jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, run(dropout_rng=jax.random.key(1)))
    seed = jax.random.bits(jax.random.key(0), (), jnp.uint32)
    expected = jax.jit(lambda seed: attention_reference(q, k, v, dropout_rate=0.5, dropout_seed=seed))(seed)
    np.testing.assert_allclose(a, expected, atol=ATOL)
    with pytest.raises(ValueError, match="dropout_rng=None"):
        run()


def test_explicit_implementations_never_fall_back():
    q, k, v = _qkv(5)
    with pytest.raises(ValueError, match="implementation='flash'"):
        fa2jax.dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="implementation='cudnn'"):
        fa2jax.dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="implementation='pallas'"):
        fa2jax.dot_product_attention(q, k, v, jnp.zeros((1, 1, 6, 6)), implementation="pallas")
    with pytest.raises(ValueError, match="k must be"):
        fa2jax.dot_product_attention(q, k[..., :4], v[..., :4], implementation="xla")


def test_automatic_choice_is_logged(caplog):
    q, k, v = _qkv(6)
    with caplog.at_level(logging.INFO, logger="fa2jax.attention"):
        out = fa2jax.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, attention_reference(q, k, v, causal=True), atol=ATOL)
    if jax.default_backend() == "cpu":
        fa2jax.attention._log_choice.cache_clear()
        with caplog.at_level(logging.INFO, logger="fa2jax.attention"):
            fa2jax.dot_product_attention(q, k, v)
        assert "chose 'xla'" in caplog.text


@pytest.mark.parametrize("kwargs", [dict(is_causal=True, segment_ids=jnp.array([[1] * 5 + [2] * 3] * 2)),
                                    dict(local_window_size=(3, 0), softcap=5.0, dropout_rate=0.25,
                                         dropout_rng=jax.random.key(3))], ids=["causal_segments", "window_dropout"])
def test_pallas_forward_and_gradients_match_xla(kwargs):
    q, k, v = _qkv(7, T=8, S=8)
    cotangent = jax.random.normal(jax.random.key(8), q.shape)

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(implementation):
        out, vjp = jax.vjp(lambda q, k, v: fa2jax.dot_product_attention(
            q, k, v, implementation=implementation, **kwargs), q, k, v)
        return out, vjp(cotangent)

    out_p, grads_p = value_and_grads("pallas")
    out_x, grads_x = value_and_grads("xla")
    np.testing.assert_allclose(out_p, out_x, atol=1e-4)
    for gp, gx in zip(grads_p, grads_x):
        np.testing.assert_allclose(gp, gx, atol=1e-4)


def _cache(seed, B=2, S=12, K=2, D=8):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (B, S, K, D)), jax.random.normal(k2, (B, S, K, D))


TREE_MASK = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])  # inference only: no VJP
def test_cache_attention_matches_reference(implementation):
    k_cache, v_cache = _cache(10)
    lengths = jnp.array([3, 7], jnp.int32)
    # Slots past each row's prefix + tree are never read: NaN there must not leak.
    past = jnp.arange(12)[None, :, None, None] >= (lengths + 4)[:, None, None, None]
    k_cache, v_cache = jnp.where(past, jnp.nan, k_cache), jnp.where(past, jnp.nan, v_cache)
    q = jax.random.normal(jax.random.key(11), (2, 4, 4, 8))
    chain = jnp.tril(jnp.ones((4, 4), bool))

    @jax.jit
    def run(q, k_cache, v_cache, lengths):
        return (fa2jax.tree_attention(q, k_cache, v_cache, lengths, TREE_MASK, implementation=implementation),
                fa2jax.decode_attention(q, k_cache, v_cache, lengths, implementation=implementation),
                tree_attention_reference(q, k_cache, v_cache, lengths, TREE_MASK),
                tree_attention_reference(q, k_cache, v_cache, lengths, chain))

    tree, decode, expected_tree, expected_decode = run(q, k_cache, v_cache, lengths)
    np.testing.assert_allclose(tree, expected_tree, atol=ATOL)
    np.testing.assert_allclose(decode, expected_decode, atol=ATOL)


def test_cache_attention_window_counts_positions():
    """With a window, node i sees prefix slot s (position s) and ancestor j (position lengths + depth(j))
    only within `window` positions of its own, lengths + depth(i)."""
    k_cache, v_cache = _cache(14)
    lengths, window, G = [3, 7], 2, 2
    q = jax.random.normal(jax.random.key(15), (2, 4, 4, 8))
    got = fa2jax.tree_attention(q, k_cache, v_cache, jnp.array(lengths), TREE_MASK, window=window,
                                implementation="xla")
    mask, depth = np.asarray(TREE_MASK), np.asarray(TREE_MASK).sum(-1) - 1
    for b, length in enumerate(lengths):
        for i in range(4):
            position = length + depth[i]
            slots = [s for s in range(length) if position - s <= window]
            slots += [length + j for j in range(4) if mask[i, j] and depth[i] - depth[j] <= window]
            for h in range(4):
                k, v = k_cache[b, np.array(slots), h // G], v_cache[b, np.array(slots), h // G]
                p = jax.nn.softmax(k @ q[b, i, h] / np.sqrt(8))
                np.testing.assert_allclose(got[b, i, h], p @ v, atol=ATOL, err_msg=f"{b=} {i=} {h=}")
    # A window as long as the cache hides nothing; the Pallas kernels have none to offer otherwise.
    unbounded = fa2jax.decode_attention(q, k_cache, v_cache, jnp.array(lengths), implementation="xla")
    np.testing.assert_array_equal(
        fa2jax.decode_attention(q, k_cache, v_cache, jnp.array(lengths), window=11, implementation="xla"), unbounded)
    with pytest.raises(ValueError, match="window=10"):
        fa2jax.decode_attention(q, k_cache, v_cache, jnp.array(lengths), window=10, implementation="pallas")


def _copy_params(src, dst):
    """Copies every parameter of one nnx module into another with the same parameter paths."""
    nnx.update(dst, nnx.state(src, nnx.Param))


@pytest.mark.parametrize("num_kv_heads,implementation",
                         [(4, "xla"), (2, "xla"), (2, "pallas")])
def test_multi_head_attention_matches_nnx(num_kv_heads, implementation):
    x = jax.random.normal(jax.random.key(12), (2, 6, 16))
    mask = nnx.make_causal_mask(jnp.ones((2, 6)))  # [B, 1, T, T]
    stock = nnx.MultiHeadAttention(4, 16, num_kv_heads=num_kv_heads, decode=False, rngs=nnx.Rngs(0))
    ours = fa2jax.MultiHeadAttention(4, 16, num_kv_heads=num_kv_heads, implementation=implementation,
                                     rngs=nnx.Rngs(1))
    _copy_params(stock, ours)

    def loss(module, x):
        return jnp.sum(jnp.sin(module(x, mask=mask)))

    (l_s, g_s), (l_o, g_o) = (nnx.jit(nnx.value_and_grad(loss))(m, x) for m in (stock, ours))
    np.testing.assert_allclose(l_o, l_s, rtol=1e-5)
    flat_s, flat_o = dict(nnx.to_flat_state(g_s)), dict(nnx.to_flat_state(g_o))
    assert flat_s.keys() == flat_o.keys()
    for path in flat_s:
        np.testing.assert_allclose(flat_o[path][...], flat_s[path][...], atol=ATOL, err_msg=str(path))
    # is_causal=True is the same mask as the explicit one
    np.testing.assert_allclose(ours(x, is_causal=True), stock(x, mask=mask), atol=ATOL)


def test_nnx_layer_with_our_attention_fn():
    x = jax.random.normal(jax.random.key(13), (2, 5, 16))
    kv = jax.random.normal(jax.random.key(14), (2, 7, 16))
    mask = jax.random.bernoulli(jax.random.key(15), 0.8, (2, 1, 5, 7)).at[..., 0].set(True)
    stock = nnx.MultiHeadAttention(4, 16, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0))
    ours = nnx.MultiHeadAttention(4, 16, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0),
                                  attention_fn=functools.partial(fa2jax.attention_fn, implementation="xla"))

    def loss(module, x, kv):
        return jnp.sum(jnp.sin(module(x, kv, mask=mask)))

    (l_s, (g_s, gx_s)), (l_o, (g_o, gx_o)) = (
        nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(m, x, kv) for m in (stock, ours))
    np.testing.assert_allclose(l_o, l_s, rtol=1e-5)
    np.testing.assert_allclose(gx_o, gx_s, atol=ATOL)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_o), nnx.to_flat_state(g_s)):
        np.testing.assert_allclose(a[...], b[...], atol=ATOL, err_msg=str(path))


def test_linen_layer_with_our_attention_fn():
    x = jax.random.normal(jax.random.key(16), (3, 6, 16))
    mask = nn.make_causal_mask(jnp.ones((3, 6)))
    stock = nn.MultiHeadDotProductAttention(num_heads=4)
    ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=fa2jax.attention_fn)
    params = stock.init(jax.random.key(0), x, mask=mask)

    def loss(module, params):
        return jnp.sum(jnp.sin(module.apply(params, x, mask=mask)))

    g_s, g_o = (jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(m, params) for m in (stock, ours))
    np.testing.assert_allclose(ours.apply(params, x, mask=mask), stock.apply(params, x, mask=mask), atol=ATOL)
    for a, b in zip(jax.tree.leaves(g_o), jax.tree.leaves(g_s)):
        np.testing.assert_allclose(a, b, atol=ATOL)


def test_attention_fn_dropout():
    q, k, v = _qkv(17, T=8, S=8)
    rng = jax.random.key(4)
    out = fa2jax.attention_fn(q, k, v, dropout_rng=rng, dropout_rate=0.3, broadcast_dropout=False,
                              deterministic=False)
    expected = fa2jax.dot_product_attention(q, k, v, dropout_rate=0.3, dropout_rng=rng)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(fa2jax.attention_fn(q, k, v, dropout_rng=rng, dropout_rate=0.3, deterministic=True),
                               attention_reference(q, k, v), atol=ATOL)
    with pytest.raises(ValueError, match="broadcast_dropout=False"):
        fa2jax.attention_fn(q, k, v, dropout_rng=rng, dropout_rate=0.3, deterministic=False)
    with pytest.raises(ValueError, match="sow_weights"):
        fa2jax.attention_fn(q, k, v, module=object())
    # Extra leading batch dims are flattened and restored.
    out5 = fa2jax.attention_fn(q[None], k[None], v[None], mask=jnp.ones((6, 1, 1, 8, 8), bool)[:1])
    np.testing.assert_allclose(out5[0], attention_reference(q, k, v), atol=ATOL)


def test_multi_head_attention_dropout_and_rope():
    x = jax.random.normal(jax.random.key(18), (2, 8, 16))
    layer = fa2jax.MultiHeadAttention(4, 16, num_kv_heads=2, dropout_rate=0.5, rope_theta=10000.0,
                                      implementation="xla", rngs=nnx.Rngs(0, dropout=1))
    clean = layer(x, deterministic=True, is_causal=True)
    a = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=5), is_causal=True)
    b = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=5), is_causal=True)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, clean)
    with pytest.raises(ValueError, match="deterministic"):
        layer(x)
    # RoPE makes attention depend on relative positions only: shifting all positions changes nothing.
    shifted = layer(x, deterministic=True, is_causal=True, positions=jnp.full((2, 8), 7) + jnp.arange(8))
    np.testing.assert_allclose(shifted, clean, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("T,S,kwargs", [
    (64, 64, {}),
    (64, 64, dict(is_causal=True)),  # cuDNN's own causal flag
    (48, 80, dict(is_causal=True)),  # bottom-right causal: a dense mask
    (64, 64, dict(local_window_size=(8, 0))),
])
def test_cudnn_matches_reference(T, S, kwargs):
    """The cuDNN path, each of its two routes (flags, dense mask), against the f32 oracle."""
    q, k, v = _qkv(11, B=2, T=T, S=S, H=4, K=2, D=64, dtype=jnp.bfloat16)
    out = fa2jax.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
    ref_kwargs = dict(causal=kwargs.get("is_causal", False))
    if "local_window_size" in kwargs:
        ref_kwargs["window_size"] = kwargs["local_window_size"]
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    expected = attention_reference(*f32, **ref_kwargs)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2)


def test_measured_fastest_table_sends_calls_to_cudnn(monkeypatch):
    """implementation=None follows fa2jax/measured_fastest.json: a recorded key goes to cuDNN, any
    other key (another feature set, head dim or device) keeps the Pallas kernels."""
    from fa2jax import attention

    chosen = []
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(attention, "device_kind", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(attention, "_log_choice", lambda name, impl, reason: chosen.append(impl))
    monkeypatch.setattr(attention.jax.nn, "dot_product_attention", lambda *a, **k: "cudnn-called")
    monkeypatch.setattr(attention.parallel_attention, "flash_attention", lambda *a, **k: "pallas-called")
    q, k, v = _qkv(3, T=8, S=8, H=2, K=2, D=256, dtype=jnp.bfloat16)
    assert fa2jax.dot_product_attention(q, k, v, is_causal=True) == "cudnn-called"
    assert fa2jax.dot_product_attention(q, k, v) == "pallas-called"  # non-causal D=256: not recorded
    q, k, v = _qkv(3, T=8, S=8, H=2, K=2, D=128, dtype=jnp.bfloat16)
    assert fa2jax.dot_product_attention(q, k, v, is_causal=True) == "pallas-called"
    assert chosen == ["cudnn", "pallas", "pallas"]
    table = attention._measured_fastest()
    assert all(entry["fastest"] in attention.IMPLEMENTATIONS for key, entry in table.items() if key != "_about")
