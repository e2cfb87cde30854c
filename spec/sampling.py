"""Temperature, top-k, nucleus (top-p) and min-p warping, shared by the drafts, the verifier and
the baseline.

Speculative sampling is lossless with respect to the *warped* target distribution, so the
speculative loop and `generate_incremental` must warp through this one function. The filters
apply in Hugging Face's order (temperature, top-k, top-p, min-p), each renormalising what it
keeps. Every setting is a traced scalar: changing one does not recompile, and a filter that is
off (top_k 0, top_p 1, min_p 0) costs one `lax.cond` that skips it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _renormalised(probs: jax.Array, keep: jax.Array) -> jax.Array:
    kept = jnp.where(keep, probs, 0.0)
    return kept / kept.sum(-1, keepdims=True)


def warp_probs(logits: jax.Array, temperature, top_p, top_k=0, min_p=0.0) -> jax.Array:
    """Turns logits into the sampling distribution after temperature, top-k, top-p and min-p.

    Args:
      logits: unnormalised log-probabilities.  # [..., V]
      temperature: scalar; 0 (or below) means greedy, a one-hot at the argmax.
      top_p: scalar in (0, 1]; keeps the smallest set of most likely tokens whose mass reaches
        top_p (the token that crosses the threshold is kept).
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

    def top_k_filter(probs):
        # A traced k: the k-th largest value comes from a full sort, not `lax.top_k` (static k).
        kth = jnp.take(jnp.sort(probs, axis=-1), vocab - jnp.clip(top_k, 1, vocab), axis=-1)[..., None]
        return _renormalised(probs, probs >= kth)

    def nucleus(probs):
        order = jnp.argsort(-probs, axis=-1)
        sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < top_p
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        return _renormalised(probs, keep)

    def min_p_filter(probs):
        return _renormalised(probs, probs >= min_p * probs.max(-1, keepdims=True))

    # Each filter off costs nothing: the sorts over V are the costliest part of sampling.
    probs = jax.lax.cond(top_k > 0, top_k_filter, lambda p: p, probs)
    probs = jax.lax.cond(top_p >= 1.0, lambda p: p, nucleus, probs)
    probs = jax.lax.cond(min_p > 0, min_p_filter, lambda p: p, probs)
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
