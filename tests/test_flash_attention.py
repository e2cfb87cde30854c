"""flash_attention vs the pure-jnp reference, forward and gradients, in Pallas interpret mode.

Tolerance basis (flash-attention's rule): the kernel's error against an f32 reference must be at most
twice the error of the same computation done by XLA in the input dtype, plus a few ulps of the
output's magnitude so that float32, where both errors are rounding noise, compares fairly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, attention_reference, flash_attention
from pallas_kernels.testing import attention_inputs, within_xla_error

SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)


def _output_and_grads(fn, q, k, v, do, **kwargs):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kwargs), q, k, v)
    return (out,) + vjp(do)


def assert_within_xla_error(actual, exact, same_dtype, dtype, what=""):
    """|actual - exact| <= 2 |xla_in_dtype - exact| + 16 ulp(dtype) * max|exact| (elementwise max)."""
    rule = within_xla_error(actual, exact, same_dtype, dtype)
    assert rule["finite"], f"{what}: non-finite values"
    assert rule["ok"], f"{what}: error {rule['err']:.3g} > 2 x XLA's {rule['xla_err']:.3g} + {rule['floor']:.3g}"


def check_against_reference(q, k, v, do, block_sizes=SMALL_BLOCKS, **kwargs):
    dtype = q.dtype
    ours = jax.jit(functools.partial(_output_and_grads, flash_attention, block_sizes=block_sizes, **kwargs))(
        q, k, v, do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    exact = _output_and_grads(attention_reference, *f32, **kwargs)
    same_dtype = _output_and_grads(
        functools.partial(attention_reference, compute_dtype=dtype, precision=jax.lax.Precision.DEFAULT),
        q, k, v, do, **kwargs)
    for name, a, e, s in zip(("out", "dq", "dk", "dv"), ours, exact, same_dtype):
        assert a.dtype == dtype, f"{name} dtype {a.dtype} != {dtype}"
        assert_within_xla_error(a, e, s, dtype, name)
    return ours


def _segments(seed, B, T, S, num_segments):
    """Sorted random segment ids, the packed-sequence layout; q and kv drawn to share ids."""
    keys = jax.random.split(jax.random.key(seed))
    q_ids = jnp.sort(jax.random.randint(keys[0], (B, T), 0, num_segments), axis=1)
    kv_ids = jnp.sort(jax.random.randint(keys[1], (B, S), 0, num_segments), axis=1)
    return q_ids, kv_ids


SHAPES = {  # (B, T, S, H, K, D)
    "T=S=1": (1, 1, 1, 2, 1, 64),
    "odd-77-gqa-d40": (2, 77, 77, 4, 2, 40),
    "T>S-d80": (1, 129, 77, 4, 4, 80),
    "T<S-mqa": (1, 77, 129, 4, 1, 64),
    "d128": (1, 48, 48, 2, 2, 128),
    "d96-T<S": (1, 33, 70, 2, 1, 96),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_shapes_float32(shape, causal):
    check_against_reference(*attention_inputs(0, *SHAPES[shape], jnp.float32), causal=causal)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", ["odd-77-gqa-d40", "T<S-mqa", "d128"])
def test_shapes_half_precision(shape, dtype):
    check_against_reference(*attention_inputs(1, *SHAPES[shape], dtype), causal=True)


def _feature_kwargs(name, B, T, S, H):
    slopes = jnp.linspace(0.05, 0.5, H, dtype=jnp.float32)
    return {
        "window": dict(window_size=(9, 4)),
        "window-left-causal": dict(window_size=(12, -1), causal=True),
        "segments": dict(segment_ids=_segments(2, B, T, S, 4)),
        "softcap": dict(softcap=1.5, sm_scale=0.7),
        "alibi-per-head": dict(alibi_slopes=slopes, causal=True),
        "alibi-per-batch": dict(alibi_slopes=jnp.tile(slopes[None], (B, 1)) * jnp.arange(1, B + 1)[:, None]),
        "mask-shared": dict(mask=jax.random.bernoulli(jax.random.key(3), 0.4, (1, 1, T, S))),
        "mask-per-head": dict(mask=jax.random.bernoulli(jax.random.key(4), 0.4, (B, H, T, S))),
        "dropout": dict(dropout_rate=0.25, dropout_seed=7),
        "everything": dict(causal=True, window_size=(20, 0), segment_ids=_segments(5, B, T, S, 3),
                           softcap=2.0, alibi_slopes=slopes, dropout_rate=0.1, dropout_seed=11,
                           mask=jax.random.bernoulli(jax.random.key(6), 0.8, (B, 1, T, S))),
    }[name]


FEATURES = ["window", "window-left-causal", "segments", "softcap", "alibi-per-head", "alibi-per-batch",
            "mask-shared", "mask-per-head", "dropout", "everything"]


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", ["odd-77-gqa-d40", "T>S-d80"])
def test_features_float32(feature, shape):
    B, T, S, H, K, D = SHAPES[shape]
    check_against_reference(*attention_inputs(8, B, T, S, H, K, D, jnp.float32),
                            **_feature_kwargs(feature, B, T, S, H))


@pytest.mark.parametrize("feature", ["segments", "softcap", "dropout", "everything"])
def test_features_bfloat16(feature):
    B, T, S, H, K, D = SHAPES["T<S-mqa"]
    check_against_reference(*attention_inputs(9, B, T, S, H, K, D, jnp.bfloat16),
                            **_feature_kwargs(feature, B, T, S, H))


def test_single_segment_ids_array_when_t_equals_s():
    B, T, S, H, K, D = SHAPES["odd-77-gqa-d40"]
    q, k, v, do = attention_inputs(10, B, T, S, H, K, D, jnp.float32)
    ids = _segments(10, B, T, T, 3)[0]
    single = flash_attention(q, k, v, segment_ids=ids, block_sizes=SMALL_BLOCKS)
    pair = flash_attention(q, k, v, segment_ids=(ids, ids), block_sizes=SMALL_BLOCKS)
    np.testing.assert_array_equal(single, pair)


def test_lse_and_its_gradient():
    B, T, S, H, K, D = SHAPES["T>S-d80"]
    q, k, v, do = attention_inputs(11, B, T, S, H, K, D, jnp.float32)
    dlse = jax.random.normal(jax.random.key(12), (B, H, T))

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v, causal=True, return_lse=True)
        return jnp.sum(out * do) + jnp.sum(lse * dlse), lse

    kernel = functools.partial(flash_attention, block_sizes=SMALL_BLOCKS)
    (_, lse), grads = jax.value_and_grad(functools.partial(loss, kernel), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, lse_ref), grads_ref = jax.value_and_grad(
        functools.partial(loss, attention_reference), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert lse.shape == (B, H, T) and lse.dtype == jnp.float32
    np.testing.assert_allclose(lse, lse_ref, atol=2e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=5e-5, rtol=1e-4)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    B, T, S, H, K, D = 1, 40, 40, 2, 1, 64
    q, k, v, do = attention_inputs(13, B, T, S, H, K, D, jnp.float32)
    mask = jnp.ones((1, 1, T, S), bool).at[:, :, 5].set(False).at[:, :, 30:].set(False)
    q_ids = jnp.zeros((B, T), jnp.int32).at[:, 7].set(9)  # query 7's segment has no keys

    def run(q, k, v):
        return flash_attention(q, k, v, mask=mask, segment_ids=(q_ids, jnp.zeros((B, S), jnp.int32)),
                               return_lse=True, block_sizes=SMALL_BLOCKS)
    (out, lse), vjp = jax.vjp(run, q, k, v)
    empty_rows = np.array([5, 7] + list(range(30, 40)))
    np.testing.assert_array_equal(out[:, empty_rows], 0.0)
    assert np.all(np.isneginf(lse[:, :, empty_rows]))
    assert np.all(np.isfinite(lse[:, :, [0, 10, 29]]))
    grads = vjp((do, jnp.zeros_like(lse)))
    for g in grads:
        assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(grads[0][:, empty_rows], 0.0)
    reference = attention_reference(q, k, v, mask=mask, segment_ids=(q_ids, jnp.zeros((B, S), jnp.int32)))
    np.testing.assert_allclose(out, reference, atol=2e-6)


def test_nan_in_padding_does_not_leak():
    """Padding tokens (their own segment id) hold NaN in q, k and v: real tokens are unaffected."""
    B, T, H, K, D = 2, 45, 4, 2, 64
    q, k, v, do = attention_inputs(14, B, T, T, H, K, D, jnp.float32)
    lengths = np.array([45, 29])
    is_pad = np.arange(T)[None, :] >= lengths[:, None]  # [B, T]
    ids = jnp.asarray(np.where(is_pad, -1, 1), jnp.int32)
    poison = lambda x: jnp.where(jnp.asarray(is_pad)[:, :, None, None], jnp.nan, x)
    do = jnp.where(jnp.asarray(is_pad)[:, :, None, None], 0.0, do)  # a loss that ignores padding

    def grads(fn, q, k, v):
        return _output_and_grads(fn, q, k, v, do, segment_ids=ids, causal=True)
    ours = grads(functools.partial(flash_attention, block_sizes=SMALL_BLOCKS), poison(q), poison(k), poison(v))
    clean = grads(attention_reference, q, k, v)
    real = ~is_pad
    for name, a, e in zip(("out", "dq", "dk", "dv"), ours, clean):
        np.testing.assert_allclose(np.asarray(a)[real], np.asarray(e)[real], atol=5e-5, err_msg=name)


def test_deterministic_bitwise():
    B, T, S, H, K, D = SHAPES["odd-77-gqa-d40"]
    q, k, v, do = attention_inputs(15, B, T, S, H, K, D, jnp.bfloat16)
    run = jax.jit(functools.partial(_output_and_grads, flash_attention, causal=True, dropout_rate=0.2,
                                    dropout_seed=3, block_sizes=SMALL_BLOCKS))
    first, second = run(q, k, v, do), run(q, k, v, do)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_dropout_seed_changes_mask_and_rate_is_respected():
    B, T, S, H, K, D = 1, 64, 64, 2, 2, 16
    q, k, v, _ = attention_inputs(16, B, T, S, H, K, D, jnp.float32)
    v_ones = jnp.ones_like(v)
    a = flash_attention(q, k, v, dropout_rate=0.3, dropout_seed=1, block_sizes=SMALL_BLOCKS)
    b = flash_attention(q, k, v, dropout_rate=0.3, dropout_seed=2, block_sizes=SMALL_BLOCKS)
    assert not np.allclose(a, b)
    # With v = 1 and a uniform softmax, the output is the kept fraction / (1 - rate): mean ~ 1.
    uniform = flash_attention(jnp.zeros_like(q), k, v_ones, dropout_rate=0.3, dropout_seed=1,
                              block_sizes=SMALL_BLOCKS)
    assert abs(float(jnp.mean(uniform)) - 1.0) < 0.05


def test_block_size_independence():
    """Different tilings (and so different padding and loop splits) compute the same function."""
    B, T, S, H, K, D = SHAPES["T>S-d80"]
    q, k, v, do = attention_inputs(17, B, T, S, H, K, D, jnp.float32)
    kwargs = dict(causal=True, window_size=(30, 2))
    small = _output_and_grads(functools.partial(flash_attention, block_sizes=SMALL_BLOCKS), q, k, v, do, **kwargs)
    large = _output_and_grads(functools.partial(flash_attention, block_sizes=BlockSizes(
        block_q=64, block_k=32, block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32)), q, k, v, do, **kwargs)
    for a, b in zip(small, large):
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-5)


def test_jax_nn_agrees_on_plain_causal_gqa():
    """An outside oracle: jax.nn.dot_product_attention (XLA) on GQA + causal with T != S."""
    q, k, v, _ = attention_inputs(18, 1, 20, 50, 4, 2, 32, jnp.float32)
    ours = flash_attention(q, k, v, causal=True, block_sizes=SMALL_BLOCKS)
    # jax.nn aligns causal masks top-left; build the bottom-right mask explicitly.
    mask = (jnp.arange(50)[None, :] <= jnp.arange(20)[:, None] + 30)[None, None]
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


BAD_ARGUMENTS = [
    (dict(q=(2, 8, 4)), "rank"),
    (dict(k=(3, 8, 2, 16)), "B and D"),
    (dict(q=(2, 8, 3, 16)), "multiple of KV heads"),
    (dict(q=(2, 8, 4, 300), k=(2, 8, 2, 300), v=(2, 8, 2, 300)), "head dim"),
    (dict(dtype=jnp.int32), "float32, bfloat16, float16"),
    (dict(kwargs=dict(window_size=(-2, 0))), "window_size"),
    (dict(kwargs=dict(window_size=3)), "window_size"),
    (dict(kwargs=dict(dropout_rate=0.5)), "seed"),
    (dict(kwargs=dict(dropout_rate=1.0, dropout_seed=1)), "dropout_rate"),
    (dict(kwargs=dict(softcap=-1.0)), "softcap"),
    (dict(kwargs=dict(alibi_slopes=jnp.ones(3))), "alibi_slopes"),
    (dict(kwargs=dict(mask=jnp.ones((2, 4, 8, 7), bool))), "mask"),
    (dict(kwargs=dict(mask=jnp.ones((2, 4, 8, 8), jnp.int32))), "boolean"),
    (dict(kwargs=dict(segment_ids=jnp.ones((2, 9), jnp.int32))), "segment ids"),
    (dict(kwargs=dict(segment_ids=(jnp.ones((2, 8)), jnp.ones((2, 8))))), "integers"),
    (dict(kwargs=dict(block_sizes="big")), "block_sizes"),
]


@pytest.mark.parametrize("case,message", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error(case, message):
    q_shape, k_shape = case.get("q", (2, 8, 4, 16)), case.get("k", (2, 8, 2, 16))
    dtype = case.get("dtype", jnp.float32)
    q = jnp.ones(q_shape, dtype)
    k = jnp.ones(k_shape, dtype)
    v = jnp.ones(case.get("v", k_shape), dtype)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **case.get("kwargs", {}))
    if "block_sizes" not in case.get("kwargs", {}):
        with pytest.raises(ValueError, match=message):
            attention_reference(q, k, v, **case.get("kwargs", {}))


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=48)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_k=8)
