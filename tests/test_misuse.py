"""Every misuse of issue 18 ("Kernels", "Tree attention", "Model", "Speculative") gets a clear error.

Each test reproduces one failure seen on the old main (a silent truncation, NaN, a late or unreadable
error) and checks the ValueError/TypeError that names the argument and value: eagerly where the
value is concrete, and under `jit` through checkify (`checked_tree_attention`, `fa2jax.checked`)
where the check needs data. The Mosaic tree kernel's NaN leak is covered in test_tree_mosaic.py
(simulator and GPU); the README snippet in test_readme.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

import fa2jax
from fa2jax import Transformer, TransformerConfig
from pallas_kernels import checked_tree_attention, flash_attention, tree_attention, tree_attention_reference
from pallas_kernels.testing import ancestor_mask, random_tree, tree_inputs
from spec import ExpansionTree, SpeculativeDecoder, generate_incremental
from test_tree_attention import check_against_reference

CHECKPOINTS = Path(__file__).resolve().parent.parent / "examples" / "checkpoints"


def _qkv(B=1, T=16, H=2, D=16):
    q = jnp.ones((B, T, H, D), jnp.float32)
    return q, q, q


# -- kernels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("window_size", [(1.5, 0), (4, 2.0), (True, 0)])
def test_window_size_must_be_ints(window_size):
    with pytest.raises(TypeError, match=r"window_size.*pair of ints"):
        flash_attention(*_qkv(), window_size=window_size)


@pytest.mark.parametrize("softcap", [float("nan"), float("inf"), -1.0])
def test_softcap_must_be_finite_and_non_negative(softcap):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="softcap"):
        flash_attention(q, k, v, softcap=softcap)
    tq, cache, lengths = jnp.ones((1, 4, 2, 16)), jnp.ones((1, 16, 2, 16)), jnp.array([2])
    with pytest.raises(ValueError, match="softcap"):
        tree_attention(tq, cache, cache, lengths, np.tril(np.ones((4, 4), bool)), softcap=softcap)


def test_sm_scale_must_be_finite():
    with pytest.raises(ValueError, match="sm_scale must be finite"):
        flash_attention(*_qkv(), sm_scale=float("nan"))


@pytest.mark.parametrize("B, H", [(0, 2), (1, 0)], ids=["B=0", "H=0"])
def test_zero_size_dimensions_are_named(B, H):
    q, kv = jnp.ones((B, 16, H, 16)), jnp.ones((B, 16, 1, 16))
    with pytest.raises(ValueError, match=rf"zero-size dimension.*q.shape=\({B}, 16, {H}, 16\)"):
        flash_attention(q, kv, kv)
    with pytest.raises(ValueError, match=rf"zero-size dimension.*q.shape=\({B}, 4, {H}, 16\)"):
        tree_attention(q[:, :4], kv, kv, jnp.zeros((B,), jnp.int32), np.eye(4, dtype=bool))


@pytest.mark.parametrize("name", ["softcap", "dropout_rate", "sm_scale"])
def test_traced_scalars_say_they_must_be_static(name):
    q, k, v = _qkv()
    extra = {"dropout_seed": 0} if name == "dropout_rate" else {}
    traced = jax.jit(lambda x: flash_attention(q, k, v, **{name: x}, **extra))
    with pytest.raises(TypeError, match=f"{name} must be a static Python number.*functools.partial"):
        traced(0.1)
    # What the message suggests works.
    fixed = jax.jit(functools.partial(flash_attention, **{name: 0.1}, **extra))
    assert fixed(q, k, v).shape == q.shape


def test_traced_tree_softcap_says_it_must_be_static():
    q, cache = jnp.ones((1, 4, 2, 16)), jnp.ones((1, 16, 2, 16))
    run = jax.jit(lambda s: tree_attention(q, cache, cache, jnp.array([2]), np.eye(4, dtype=bool), softcap=s))
    with pytest.raises(TypeError, match="softcap must be a static Python number"):
        run(1.0)


# -- tree attention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [tree_attention, tree_attention_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("lengths", [[13, 0], [0, -1]], ids=["past-S-N", "negative"])
def test_out_of_range_cache_lengths_raise_eagerly(fn, lengths):
    N, S = 4, 16
    q, cache = jnp.ones((2, N, 2, 16)), jnp.ones((2, S, 2, 16))
    with pytest.raises(ValueError, match=rf"cache_lengths must lie in \[0, S - N\] = \[0, {S - N}\].*{lengths}"):
        fn(q, cache, cache, jnp.array(lengths, jnp.int32), np.tril(np.ones((N, N), bool)))


NOT_TREES = {  # every node sees itself, so only the full closure check catches these
    "cycle": lambda m: m.__setitem__((0, 1), True),
    "not-transitive": lambda m: m.__setitem__((3, 0), False),
    "two-parents": lambda m: m.__setitem__((4, 2), True),
}


@pytest.mark.parametrize("name", list(NOT_TREES))
def test_checked_tree_attention_catches_non_tree_masks_under_jit(name):
    N, S = 5, 24
    mask = ancestor_mask([-1, 0, 0, 1, 3])  # 0 -> {1, 2}, 1 -> 3 -> 4
    NOT_TREES[name](mask)
    rng = np.random.default_rng(0)
    q, k, v, lengths = tree_inputs(rng, B=2, N=N, H=2, K=1, D=16, S=S, dtype=jnp.float32, lengths=[3, 10])
    run = jax.jit(lambda m: checked_tree_attention(q, k, v, lengths, m)[0])
    with pytest.raises(checkify.JaxRuntimeError, match="not a tree closure"):
        run(jnp.asarray(mask)).throw()
    run(jnp.asarray(ancestor_mask([-1, 0, 0, 1, 3]))).throw()  # the tree itself passes
    with pytest.raises(ValueError, match="not a tree closure"):  # and a concrete mask raises at once
        tree_attention(q, k, v, lengths, mask)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_portable_tree_kernel_ignores_nan_past_the_tree(num_splits):
    # The ragged case scaled down: one row full to S - N, one with a single committed token,
    # GQA, random trees, NaN in every slot past cache_lengths + N.
    rng = np.random.default_rng(18)
    B, N, S = 2, 16, 80
    q, k, v, lengths = tree_inputs(rng, B=B, N=N, H=4, K=2, D=16, S=S, dtype=jnp.float32, lengths=[S - N, 1])
    assert np.isnan(np.asarray(v[1, N + 1:])).all()
    mask = np.stack([random_tree(rng, N), random_tree(rng, N, 5)])
    out = check_against_reference(q, k, v, lengths, mask, num_splits=num_splits, backend="portable")
    assert np.isfinite(np.asarray(out)).all()


# -- model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return Transformer(TransformerConfig.tiny(max_len=16, num_layers=1), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def filled(model):
    """A cache of 2 rows x 8 slots with 4 committed tokens each (their K/V do not matter here)."""
    cache = model.init_cache(2, 8)
    return cache.replace(lengths=jnp.array([4, 4], jnp.int32))


def test_decoding_past_the_cache_end_raises(model, filled):
    fa2jax.checking.check_cache_room(filled.lengths, 4, filled.max_len, "decoding")  # exactly full is fine
    with pytest.raises(ValueError, match=r"decoding past the cache's end.*cache.lengths\[0\]=4.*5 more.*max_len=8"):
        model.decode(jnp.ones((2, 5), jnp.int32), filled)
    with pytest.raises(ValueError, match="scoring the tree past the cache's end"):
        model.score_tree(jnp.ones((2, 5), jnp.int32), np.tril(np.ones((5, 5), bool)), filled)


@pytest.mark.parametrize("lengths", [[5, 4], [-1, 4]])
def test_prefill_lengths_outside_0_T_raise(model, lengths):
    with pytest.raises(ValueError, match=rf"prefill lengths must lie in \[0, T=4\].*{lengths}"):
        model.prefill(jnp.ones((2, 4), jnp.int32), jnp.array(lengths), model.init_cache(2, 8))


def test_batch_mismatch_with_the_cache_names_both(model, filled):
    with pytest.raises(ValueError, match=r"batch 3 but the cache holds 2 rows"):
        model.decode(jnp.ones((3, 1), jnp.int32), filled)
    with pytest.raises(ValueError, match=r"batch 2 but the cache holds 3 rows"):
        model.prefill(jnp.ones((2, 4), jnp.int32), jnp.array([4, 4]), model.init_cache(3, 8))


@pytest.mark.parametrize("token", [128, 1000, -1])
def test_token_ids_outside_the_vocabulary_raise(model, filled, token):
    with pytest.raises(ValueError, match=rf"token ids in \[0, vocab_size=128\).*\[{token}"):
        model.decode(jnp.full((2, 1), token, jnp.int32), filled)
    with pytest.raises(ValueError, match="token ids"):
        model(jnp.full((1, 3), token, jnp.int32))
    with pytest.raises(ValueError, match=r"token ids.*first bad at index \[1, 0\]"):
        model.prefill(jnp.array([[1, 2, 3, 4], [token, 1, 1, 1]]), jnp.array([4, 1]), model.init_cache(2, 8))


def test_padded_vocabulary_logits_are_minus_inf(model):
    padded = fa2jax.model.replace_config(model, tokenizer_vocab_size=100)
    graphdef, state = nnx.split(padded)
    call = jax.jit(lambda state, method, *args: getattr(nnx.merge(graphdef, state), method)(*args),
                   static_argnums=1)
    tokens = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)
    logits, cache = call(state, "prefill", tokens, jnp.array([4, 2]), padded.init_cache(2, 8))
    assert np.isneginf(np.asarray(logits[..., 100:])).all()
    # The training forward leaves them (losses take logs of probabilities); elsewhere the same logits.
    forward = call(state, "__call__", tokens)
    assert np.isfinite(np.asarray(forward)).all()
    np.testing.assert_allclose(logits[..., :100], forward[..., :100], rtol=1e-5, atol=1e-5)
    assert np.isneginf(np.asarray(call(state, "decode", jnp.ones((2, 1), jnp.int32), cache)[0][..., 100:])).all()
    with pytest.raises(ValueError, match="tokenizer_vocab_size"):
        TransformerConfig.tiny(tokenizer_vocab_size=129)


def test_checked_mode_catches_data_dependent_misuse_under_jit(model, filled):
    graphdef, state = nnx.split(model)

    def decode(state, tokens, cache):
        return nnx.merge(graphdef, state).decode(tokens, cache)

    plain = jax.jit(decode)
    checked = jax.jit(fa2jax.checked(decode))
    error, (logits, _) = checked(state, jnp.full((2, 1), 3, jnp.int32), filled)
    error.throw()  # a good call passes, with the plain call's logits
    np.testing.assert_array_equal(logits, plain(state, jnp.full((2, 1), 3, jnp.int32), filled)[0])
    for tokens, match in ((jnp.full((2, 1), 200, jnp.int32), "token ids"),
                          (jnp.full((2, 1), -3, jnp.int32), "token ids"),
                          (jnp.ones((2, 5), jnp.int32), "past the cache's end")):
        error, _ = checked(state, tokens, filled)
        with pytest.raises(checkify.JaxRuntimeError, match=match):
            error.throw()

    def prefill(state, tokens, lengths, cache):
        return nnx.merge(graphdef, state).prefill(tokens, lengths, cache)

    checked_prefill = jax.jit(fa2jax.checked(prefill))
    error, _ = checked_prefill(state, jnp.ones((2, 4), jnp.int32), jnp.array([5, 1]), model.init_cache(2, 8))
    with pytest.raises(checkify.JaxRuntimeError, match="prefill lengths"):
        error.throw()
    # Prompt padding (past lengths) is not a token and may hold anything, eagerly or not.
    padding = jnp.array([[1, 2, 3, 4], [5, 6, -1, 128]], jnp.int32)
    checked_prefill(state, padding, jnp.array([4, 2]), model.init_cache(2, 8))[0].throw()
    with pytest.raises(checkify.JaxRuntimeError, match="token ids"):
        checked_prefill(state, padding, jnp.array([4, 3]), model.init_cache(2, 8))[0].throw()
    fa2jax.checking.check_token_ids(padding, 128, "tokens", jnp.arange(4)[None, :] < jnp.array([[4], [2]]))


def test_load_pretrained_masks_the_rows_past_the_tokenizer():
    # train.py rounds the byte tokenizer's 257 ids up to 384.
    model = fa2jax.load_pretrained(CHECKPOINTS / "draft" / "step_00001500")
    assert (model.config.vocab_size, model.config.tokenizer_vocab_size) == (384, 257)


# -- speculative decoding ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    config = TransformerConfig.tiny()
    return Transformer(config, rngs=nnx.Rngs(0)), Transformer(config.replace(num_layers=1), rngs=nnx.Rngs(1))


def test_generate_inside_jit_says_to_call_it_outside(pair):
    target, draft = pair
    decoder = SpeculativeDecoder(target, [draft], tree=(1, 1))
    lengths = jnp.array([3])
    with pytest.raises(TypeError, match=r"inside jax.jit \(prompt is traced\).*call it outside jax.jit"):
        jax.jit(lambda p: decoder.generate(p, lengths, max_new_tokens=4))(jnp.ones((1, 3), jnp.int32))
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda p: generate_incremental(target, p, lengths, max_new_tokens=4))(jnp.ones((1, 3), jnp.int32))


def test_tree_too_big_for_the_kernel_is_rejected_when_built(pair):
    target, draft = pair
    tree = ExpansionTree((2, 2, 2, 2, 2, 2, 2))  # 255 nodes
    on_kernel = fa2jax.model.replace_config(target, attention_impl="pallas")
    with pytest.raises(ValueError, match=r"the tree has 255 nodes.*the target.*at most 128"):
        SpeculativeDecoder(on_kernel, [draft], tree=tree)
    with pytest.raises(ValueError, match=r"the tree has 255 nodes.*draft 0.*at most 128"):
        SpeculativeDecoder(target, [fa2jax.model.replace_config(draft, attention_impl="pallas")], tree=tree)
    SpeculativeDecoder(fa2jax.model.replace_config(target, attention_impl="xla"), [draft], tree=tree)  # dense: any N
