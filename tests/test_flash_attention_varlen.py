"""flash_attention_varlen against per-sequence attention_reference, values and gradients (interpret mode).

The reference slices each sequence out of the packed arrays and runs the dense oracle on it alone
(bottom-right causal per sequence), so the comparison covers the layout, the per-sequence causal
alignment and the segment masking at once. Tolerances follow tests/test_flash_attention.py: at most
twice XLA's own error in the input dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_reference, flash_attention_varlen
from test_flash_attention import SMALL_BLOCKS, assert_within_xla_error


def _per_sequence(fn, q, k, v, cu_q, cu_k, **kwargs):
    """out [total_q, H, D] and lse [H, total_q] of `fn` run on every sequence alone."""
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b]: cu_q[b + 1]][None]
        if qb.shape[1] == 0:
            continue
        out, lse = fn(qb, k[cu_k[b]: cu_k[b + 1]][None], v[cu_k[b]: cu_k[b + 1]][None], return_lse=True, **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    return jnp.concatenate(outs), jnp.concatenate(lses, axis=1)


def _packed_inputs(seed, q_lens, k_lens, H, K, D, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    tq, tk = sum(q_lens), sum(k_lens)
    q = jax.random.normal(keys[0], (tq, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (tk, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (tk, K, D), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (tq, H, D), jnp.float32).astype(dtype)
    cu_q, cu_k = np.cumsum([0, *q_lens]), np.cumsum([0, *k_lens])
    return q, k, v, do, cu_q.astype(np.int32), cu_k.astype(np.int32)


# q lengths, k lengths, H, K, D, dtype, kwargs, traced cu_seqlens; odd lengths throughout. Traced
# cu_seqlens (jit arguments) take the static bound on the aligned length, concrete ones the exact one.
CASES = {
    # T_b != S_b, bottom-right per sequence; an empty query sequence; D padded to 64 inside
    "causal-gqa-traced": ([7, 1, 13, 0], [7, 4, 20, 3], 4, 2, 40, jnp.float32, dict(causal=True), True),
    # the packed layout (no position-dependent mask), MQA
    "full-mqa": ([5, 12, 3], [9, 2, 17], 4, 1, 16, jnp.float32, {}, False),
    # T_b > S_b: the first queries see no key and output zeros
    "causal-q-longer-bf16": ([9, 3], [4, 3], 4, 2, 32, jnp.bfloat16, dict(causal=True), False),
    "window-softcap-alibi": ([6, 11], [10, 11], 2, 2, 16, jnp.float32,
                             dict(window_size=(3, 1), softcap=2.0, alibi_slopes=jnp.array([0.3, 0.1])), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_per_sequence_reference(case):
    q_lens, k_lens, H, K, D, dtype, kwargs, traced = CASES[case]
    q, k, v, do, cu_q, cu_k = _packed_inputs(3, q_lens, k_lens, H, K, D, dtype)
    dlse = jax.random.normal(jax.random.key(4), (H, q.shape[0]))

    def ours(q, k, v, cu_q, cu_k):
        return flash_attention_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), return_lse=True,
                                      block_sizes=SMALL_BLOCKS, **kwargs)

    def with_vjp(fn, q, k, v):
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        # lse is -inf for a query with no key: its cotangent is zeroed, as it must be for finite grads.
        return (out, lse) + vjp((do.astype(out.dtype), jnp.where(jnp.isfinite(lse), dlse, 0.0)))

    # jit everywhere: eager interpret-mode kernels are slow. Concrete cu_seqlens are closed over
    # (constants: the exact aligned length), traced ones are arguments (the static bound).
    if traced:
        got = jax.jit(lambda q, k, v, a, b: with_vjp(lambda q, k, v: ours(q, k, v, a, b), q, k, v))(
            q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k))
    else:
        got = jax.jit(lambda q, k, v: with_vjp(lambda q, k, v: ours(q, k, v, cu_q, cu_k), q, k, v))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    exact = jax.jit(lambda q, k, v: with_vjp(
        lambda q, k, v: _per_sequence(attention_reference, q, k, v, cu_q, cu_k, **kwargs), q, k, v))(*f32)
    in_dtype = functools.partial(attention_reference, compute_dtype=dtype, precision=jax.lax.Precision.DEFAULT)
    same_dtype = jax.jit(lambda q, k, v: with_vjp(
        lambda q, k, v: _per_sequence(in_dtype, q, k, v, cu_q, cu_k, **kwargs), q, k, v))(q, k, v)
    out, lse = got[:2]
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (H, q.shape[0])
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(exact[1]))
    finite = np.isfinite(np.asarray(exact[1]))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(exact[1])[finite], atol=1e-4, rtol=1e-4)
    for name, i in (("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        assert got[i].dtype == dtype, name
        assert_within_xla_error(got[i], exact[i], same_dtype[i], dtype, f"{case} {name}")
    if case == "causal-q-longer-bf16":
        np.testing.assert_array_equal(np.asarray(out[:5], np.float32), 0.0)  # rows 0-4 of sequence 0


def test_equal_q_and_k_lengths_add_no_padding():
    """Self-attention (the same cu_seqlens for q and k) runs at the packed length: nothing is copied
    into slots, and the result equals attention_reference with segment ids on the packed batch."""
    lens = [5, 9, 2]
    q, k, v, _, cu, _ = _packed_inputs(5, lens, lens, 2, 1, 16, jnp.float32)
    out = jax.jit(lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, 9, 9, causal=True,
                                                         block_sizes=SMALL_BLOCKS))(q, k, v)
    ids = jnp.repeat(jnp.arange(3), jnp.array(lens))[None]
    expected = attention_reference(q[None], k[None], v[None], causal=True, segment_ids=ids)[0]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_bad_arguments_raise():
    q, k, v, _, cu_q, cu_k = _packed_inputs(6, [3, 4], [3, 4], 2, 2, 16, jnp.float32)
    call = functools.partial(flash_attention_varlen, q, k, v)
    bad = {
        "must start at 0": (np.array([1, 3, 7]), cu_k, 4, 4),
        "non-decreasing": (np.array([0, 5, 3, 7]), np.array([0, 3, 5, 7]), 5, 4),
        "must end at the packed length 7": (np.array([0, 3, 6]), cu_k, 4, 4),
        "longer than max_seqlen_q=3": (cu_q, cu_k, 3, 4),
        "max_seqlen_k must be a positive int": (cu_q, cu_k, 4, 0),
        "as many sequences": (cu_q, np.array([0, 7]), 4, 7),
        "must be integers": (cu_q.astype(np.float32), cu_k, 4, 4),
        r"must be 1-D": (cu_q[None], cu_k, 4, 4),
    }
    for message, (a, b, mq, mk) in bad.items():
        with pytest.raises(ValueError, match=message):
            call(a, b, mq, mk)
    with pytest.raises(ValueError, match="q must have rank 3"):
        flash_attention_varlen(q[None], k, v, cu_q, cu_k, 4, 4)
    with pytest.raises(ValueError, match="alibi_slopes must be"):
        call(cu_q, cu_k, 4, 4, causal=True, alibi_slopes=jnp.ones((2, 2)))
