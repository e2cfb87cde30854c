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


def next_token_targets(tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each position's next-token target and whether it counts, in the shape of the tokens.

    Per position rather than shifted (`target_mask`), so that the pairs survive any permutation
    of the positions: context parallelism computes its loss in the zig-zag token order.

    Args:
      tokens, segment_ids: [..., T] int32.

    Returns:
      (targets [..., T] int32, mask [..., T] bool); the last position has target 0, not counted.
    """
    last = jnp.zeros_like(tokens[..., :1])
    targets = jnp.concatenate([tokens[..., 1:], last], axis=-1)
    valid = (segment_ids[..., 1:] == segment_ids[..., :-1]) & (segment_ids[..., 1:] != 0)
    mask = jnp.concatenate([valid, jnp.zeros_like(valid[..., :1])], axis=-1)
    return targets, mask


def token_cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of `targets` where `mask`, and the count of those positions.

    Args:
      logits: [B, T, V] float32; targets: [B, T] int32; mask: [B, T] bool.

    Returns:
      (nll_sum [], count []) in float32.
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.float32)


def cross_entropy_sum(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over valid targets, and their count.

    Args:
      logits: [B, T, V] float32.
      tokens: [B, T] int32.
      segment_ids: [B, T] int32.

    Returns:
      (nll_sum [], count []) in float32.
    """
    return token_cross_entropy_sum(logits[:, :-1], tokens[:, 1:], target_mask(segment_ids))


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
    return token_distillation_kl_sum(student_logits[:, :-1], teacher_logits[:, :-1], target_mask(segment_ids),
                                     temperature)


def token_distillation_kl_sum(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
                              temperature: float) -> jax.Array:
    """`distillation_kl_sum` at the positions where `mask` [B, T] is True (logits [B, T, V])."""
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)  # [B, T, V]
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)  # [B, T, V]
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B, T]
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
