"""Temperature and nucleus (top-p) warping, shared by the drafts, the verifier and the baseline.

Speculative sampling is lossless with respect to the *warped* target distribution, so the
speculative loop and `generate_incremental` must warp through this one function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def warp_probs(logits: jax.Array, temperature, top_p) -> jax.Array:
    """Turns logits into the sampling distribution after temperature and top-p.

    Args:
      logits: unnormalised log-probabilities.  # [..., V]
      temperature: scalar; 0 (or below) means greedy, a one-hot at the argmax.
      top_p: scalar in (0, 1]; keeps the smallest set of most likely tokens whose mass reaches
        top_p (the token that crosses the threshold is kept).

    Returns:
      probabilities.  # [..., V] f32
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    greedy = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
    # The max() only guards the division in the branch that greedy replaces.
    probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6), axis=-1)

    def nucleus(probs):
        order = jnp.argsort(-probs, axis=-1)
        sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < top_p
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        kept = jnp.where(keep, probs, 0.0)
        return kept / kept.sum(-1, keepdims=True)

    # top_p = 1 keeps everything: skip the two argsorts over V, the costliest part of sampling.
    probs = jax.lax.cond(top_p >= 1.0, lambda p: p, nucleus, probs)
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
