"""Numeric constants and helpers shared by every kernel family.

The kernels keep scores in log2 units and use exp2: with no softcap or ALiBi, log2(e) folds into the
softmax scale, so each score costs one multiply before exp2 (FA2's Triton kernels do the same). A
logsumexp leaves a kernel in natural-log units again through LN2.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def is_power_of_two(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def next_power_of_two(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(int(x) - 1, 0).bit_length()


def softcap_unscaled(s, *, sm_scale: float, softcap: float):
    """Gemma 2's logit cap on unscaled scores s = q.k, kept in unscaled units so that a kernel's
    `s * sm_scale * LOG2E` before exp2 stays as it is: (softcap / sm_scale) * tanh(sm_scale * s / softcap)
    = softcap * tanh(x / softcap) / sm_scale for the scaled score x. Returns (capped scores, their
    derivative d capped / d s = 1 - tanh^2), which a backward multiplies into dS."""
    t = jnp.tanh(s * (sm_scale / softcap))
    return t * (softcap / sm_scale), 1.0 - t * t


def backward_lse(lse):
    """The forward's log-sum-exp (natural log, [B, H, T]) in the units the backward kernels take:
    log2, with a fully masked row's -inf turned to +inf so that every P of that row is exactly 0."""
    return jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
