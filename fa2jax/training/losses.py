"""Losses over packed batches: next-token cross entropy, distillation KL, speculative acceptance.

Every sum counts only positions whose next token is a valid target: in the same document
(segment) as the input token and not padding. Sums and counts are returned separately so that
gradient accumulation divides by the target count of the whole step.

Distillation: loss = (1 - w) * CE + w * T^2 * KL(teacher_T || student_T) (Hinton et al. 2015,
"Distilling the knowledge in a neural network"). A draft trained this way matches the target's
whole distribution, which is what the speculative acceptance rule rewards: with draft q and
target p, a sampled draft token is accepted with probability sum_x min(p(x), q(x)) (Leviathan et
al. 2023, "Fast inference from transformers via speculative decoding", §3).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def target_mask(segment_ids: jax.Array) -> jax.Array:
    """Which next-token targets count: same segment as the input token, not padding.

    Args:
      segment_ids: [B, T] int, 0 = padding.

    Returns:
      [B, T-1] bool, entry t is whether token t+1 is a valid target for position t.
    """
    return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)


def cross_entropy_sum(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over valid targets, and their count.

    Args:
      logits: [B, T, V] float32.
      tokens: [B, T] int32.
      segment_ids: [B, T] int32.

    Returns:
      (nll_sum [], count []) in float32.
    """
    mask = target_mask(segment_ids)  # [B, T-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])  # [B, T-1]
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.float32)


def distillation_kl_sum(student_logits: jax.Array, teacher_logits: jax.Array, segment_ids: jax.Array,
                        temperature: float) -> jax.Array:
    """Sum over valid positions of T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    Args:
      student_logits, teacher_logits: [B, T, V] float32, same vocabulary.
      segment_ids: [B, T] int32; positions whose next token is not a valid target are skipped.
      temperature: T; the T^2 factor keeps gradient sizes comparable across temperatures.

    Returns:
      [] float32.
    """
    mask = target_mask(segment_ids)  # [B, T-1]
    log_q = jax.nn.log_softmax(student_logits[:, :-1] / temperature, axis=-1)  # [B, T-1, V]
    log_p = jax.nn.log_softmax(teacher_logits[:, :-1] / temperature, axis=-1)  # [B, T-1, V]
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B, T-1]
    return temperature**2 * jnp.sum(jnp.where(mask, kl, 0.0))


def acceptance_sums(draft_logits: jax.Array, target_logits: jax.Array, segment_ids: jax.Array) -> dict:
    """Per-token speculative acceptance of a draft against a target, summed over valid positions.

    `sampled`: sum_x min(p(x), q(x)), the chance that a token sampled from the draft q survives
    the speculative-sampling test against the target p (temperature 1). `greedy`: whether the two
    argmaxes agree (greedy verification). Divide by `count` for rates.

    Args:
      draft_logits, target_logits: [B, T, V] float32.
      segment_ids: [B, T] int32.

    Returns:
      {"sampled": [], "greedy": [], "count": []} float32.
    """
    mask = target_mask(segment_ids)  # [B, T-1]
    q = jax.nn.softmax(draft_logits[:, :-1], axis=-1)  # [B, T-1, V]
    p = jax.nn.softmax(target_logits[:, :-1], axis=-1)  # [B, T-1, V]
    sampled = jnp.sum(jnp.minimum(p, q), axis=-1)  # [B, T-1]
    greedy = jnp.argmax(draft_logits[:, :-1], -1) == jnp.argmax(target_logits[:, :-1], -1)  # [B, T-1]
    return {
        "sampled": jnp.sum(jnp.where(mask, sampled, 0.0)),
        "greedy": jnp.sum(mask & greedy).astype(jnp.float32),
        "count": jnp.sum(mask).astype(jnp.float32),
    }
