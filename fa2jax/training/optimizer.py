"""The optimizer: global-norm clipping, then AdamW (decay on matrices only) on a warmup-cosine schedule."""
from __future__ import annotations

import jax
import optax

from fa2jax.training.presets import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """0 -> cfg.learning_rate linearly over the warmup, then a cosine down to min_lr_ratio of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on the warmup-cosine schedule (no decay on vectors)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )
