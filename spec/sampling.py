"""Temperature, top-k, nucleus (top-p) and min-p warping, shared by the drafts, the verifier and
the baseline.

Speculative sampling is lossless with respect to the *warped* target distribution, so the
speculative loop and `generate_incremental` must warp through this one function. The filters
apply in Hugging Face's order (temperature, top-k, top-p, min-p), each renormalising what it
keeps. Every setting is a traced scalar: changing one does not recompile. The filters find their
thresholds without sorting the vocabulary and without conditionals (see `_first_true`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _renormalised(probs: jax.Array, keep: jax.Array) -> jax.Array:
    kept = jnp.where(keep, probs, 0.0)
    return kept / kept.sum(-1, keepdims=True)


# The filters' thresholds come from a search over float32 bit patterns instead of a sort over V: a
# sort of [rows, V] (an argsort and its inverse for top-p) is a long chain of kernels on a GPU and
# cost a sampled speculative step more than the target's tree pass. Non-negative float32 values
# order as their bit patterns (int32 in [0, 2^31)), so a monotone test of a threshold pattern finds
# the boundary value exactly in 8 rounds of 16-way search (15 candidates, one fused reduction over V
# each round), and no `lax.cond` is needed to skip a filter that is off: on a GPU each conditional is
# a device-to-host copy of its predicate and a wait.
_SEARCH_SPAN = 2 ** 31
_FANOUT = 16


def _first_true(test, batch_shape) -> jax.Array:
    """The smallest int32 T in [0, 2^31) with test(T) true, per row, for a test that is false below
    some T and true from it on (true at 2^31 - 1 is assumed).

    Args:
      test: candidates [..., n] int32 -> bool [..., n], the same monotone test in every column.
      batch_shape: the rows' shape (...).

    Returns:
      int32 [...].
    """
    lo = jnp.full(batch_shape, -1, jnp.int32)  # invariant: test(lo) false (lo = -1: below the range)
    span = _SEARCH_SPAN  # ... and the answer lies in (lo, lo + span]
    while span > 1:
        step = max(span // _FANOUT, 1)
        offsets = jnp.arange(1, span // step, dtype=jnp.int32) * step  # [n]
        false_count = jnp.sum(~test(lo[..., None] + offsets), axis=-1, dtype=jnp.int32)
        lo = lo + false_count * step
        span = step
    return lo + 1


def _bits(probs: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(probs, jnp.int32)


def _keep_top_k(probs: jax.Array, top_k) -> jax.Array:
    """bool: the tokens at least as likely as the k-th most likely (its ties included)."""
    bits = _bits(probs)
    # count(bits >= T) < k is false up to the k-th largest pattern and true past it.
    past_kth = _first_true(
        lambda t: jnp.sum(bits[..., None, :] >= t[..., None], axis=-1, dtype=jnp.int32) < top_k, probs.shape[:-1])
    return bits >= (past_kth - 1)[..., None]


def _keep_nucleus(probs: jax.Array, top_p) -> jax.Array:
    """bool: the most likely tokens until their mass reaches top_p, the one crossing it included
    (a token is kept when the tokens more likely than it hold less than top_p)."""
    bits = _bits(probs)
    # The mass strictly above a pattern falls as the pattern rises: the first pattern under top_p
    # is the least likely kept token's.
    least_kept = _first_true(
        lambda t: jnp.sum(jnp.where(bits[..., None, :] > t[..., None], probs[..., None, :], 0.0), axis=-1) < top_p,
        probs.shape[:-1])
    return bits >= least_kept[..., None]


def warp_probs(logits: jax.Array, temperature, top_p, top_k=0, min_p=0.0) -> jax.Array:
    """Turns logits into the sampling distribution after temperature, top-k, top-p and min-p.

    Args:
      logits: unnormalised log-probabilities.  # [..., V]
      temperature: scalar; 0 (or below) means greedy, a one-hot at the argmax.
      top_p: scalar in (0, 1]; keeps the smallest set of most likely tokens whose mass reaches
        top_p (the token that crosses the threshold is kept, and the tokens tied with it).
      top_k: int scalar; > 0 keeps the tokens at least as likely as the k-th most likely (ties
        with it included, as Hugging Face's top-k does); 0 keeps all.
      min_p: scalar in [0, 1); keeps the tokens with probability >= min_p x the largest one
        (Nguyen et al., "min-p sampling", 2024); 0 keeps all.

    Returns:
      probabilities.  # [..., V] f32
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    min_p = jnp.asarray(min_p, jnp.float32)
    greedy = jax.nn.one_hot(jnp.argmax(logits, -1), vocab, dtype=jnp.float32)
    # The max() only guards the division in the branch that greedy replaces.
    probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6), axis=-1)
    probs = jnp.where(top_k > 0, _renormalised(probs, _keep_top_k(probs, top_k)), probs)
    # top_p = 1 keeps every token outright, whatever the rounding of the mass.
    probs = jnp.where(top_p >= 1.0, probs, _renormalised(probs, _keep_nucleus(probs, top_p)))
    probs = jnp.where(min_p > 0, _renormalised(probs, probs >= min_p * probs.max(-1, keepdims=True)), probs)
    return jnp.where(temperature > 0, probs, greedy)


def sample_probs(key: jax.Array, probs: jax.Array) -> jax.Array:
    """Draws one token per row from explicit probabilities.

    Args:
      key: PRNG key.
      probs: probabilities, zeros allowed.  # [..., V]

    Returns:
      token ids.  # [...] int32
    """
    logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
