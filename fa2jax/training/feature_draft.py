"""Training a `fa2jax.feature_head.FeatureHead` on a frozen target's features (EAGLE's recipe).

Per packed batch, the target runs once (no gradient) and gives its final hidden states f and
logits; the head reads (f_i, e(x_{i+1})) and predicts f^_{i+1}. The loss (Li et al., EAGLE,
ICML'24, §4.2) is

    feature_weight * smooth-L1(f^_{i+1}, f_{i+1}) + token_weight * CE(p_{i+2}, softmax(head(f^_{i+1})))

with p_{i+2} the target's own next-token distribution at position i + 1 (soft labels: the head is
graded on matching the target, not the text) and `head` the target's LM head, shared and frozen.
EAGLE weighs them 1 and 0.1. Uniform noise of amplitude `input_noise` on the input features
(EAGLE's augmentation) teaches the head to read its own, imperfect predictions at deeper levels.
Only positions whose next token lies in the same document count (`losses.target_mask`).

The optimizer, schedule and data order are the Transformer trainer's (`TrainConfig`,
`make_optimizer`, `BatchSchedule`); the head is saved with `save_feature_head` at the end and every
`checkpoint_every` steps. `examples/train.py --draft-kind feature --teacher PATH` runs `train_feature_head`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fa2jax.data import BatchSchedule, PackedRows, eval_batches
from fa2jax.feature_head import FeatureHead, FeatureHeadConfig, count_params, save_feature_head
from fa2jax.model import Transformer
from fa2jax.tokenizer import Tokenizer
from fa2jax.training import progress
from fa2jax.training.loop import NonFiniteLossError
from fa2jax.training.losses import target_mask
from fa2jax.training.metrics import append_metrics
from fa2jax.training.optimizer import learning_rate_schedule, make_optimizer
from fa2jax.training.presets import TrainConfig


@dataclasses.dataclass(frozen=True)
class FeatureLossConfig:
    """Weights of the EAGLE loss and the input augmentation.

    Attributes:
      feature_weight: weight of the smooth-L1 regression onto the target's next feature.
      token_weight: weight of the cross entropy against the target's next-token distribution.
      input_noise: amplitude a of the U(-a, a) noise added to the target's features the head reads.
    """

    feature_weight: float = 1.0
    token_weight: float = 0.1
    input_noise: float = 0.0

    def __post_init__(self):
        for name in ("feature_weight", "token_weight", "input_noise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
        if self.feature_weight == self.token_weight == 0:
            raise ValueError(f"the loss needs a positive weight: {self.feature_weight=} {self.token_weight=}")


def feature_loss_sums(head: FeatureHead, target: Transformer, batch: dict, loss_cfg: FeatureLossConfig,
                      key: jax.Array | None = None) -> dict:
    """The EAGLE loss terms of one packed batch, summed over the valid positions.

    Args:
      head: the head (its parameters are what a gradient would be taken of).
      target: the frozen target; its outputs are cut from the gradient.
      batch: "tokens", "segment_ids", "positions".  # [B, T] int32 each
      loss_cfg: weights and noise.
      key: PRNG key of the input noise (unused when `input_noise` is 0).

    Returns:
      {"loss", "feature", "token", "agree", "count"}: [] float32 sums; "agree" counts positions
      where the head's argmax on its predicted feature equals the target's next-token argmax (the
      depth-1 greedy acceptance with the target's own context features). Divide by "count".
    """
    tokens, segments, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
    logits, hidden = target(tokens, segments, positions, return_hidden=True)  # [B, T, V], [B, T, d]
    logits, hidden = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(hidden)
    features = hidden[:, :-1]  # f_i  [B, T-1, d]
    if loss_cfg.input_noise > 0:
        noise = jax.random.uniform(key, features.shape, jnp.float32, -loss_cfg.input_noise, loss_cfg.input_noise)
        features = (features.astype(jnp.float32) + noise).astype(features.dtype)
    embeddings = jax.lax.stop_gradient(target.embed_tokens(tokens[:, 1:]))  # e(x_{i+1})  [B, T-1, d]
    predicted = head(features, embeddings, segments[:, :-1], positions[:, :-1])  # f^_{i+1}  [B, T-1, d]
    mask = target_mask(segments)  # [B, T-1]
    err = predicted.astype(jnp.float32) - hidden[:, 1:].astype(jnp.float32)
    smooth_l1 = optax.huber_loss(err, delta=1.0).mean(-1)  # [B, T-1]
    log_q = jax.nn.log_softmax(target.head_logits(predicted, mask_padding=False), -1)  # [B, T-1, V]
    p = jax.nn.softmax(logits[:, 1:], -1)  # the target's distribution of x_{i+2}
    cross_entropy = -jnp.sum(p * log_q, -1)  # [B, T-1]
    agree = jnp.argmax(log_q, -1) == jnp.argmax(logits[:, 1:], -1)
    feature = jnp.sum(jnp.where(mask, smooth_l1, 0.0))
    token = jnp.sum(jnp.where(mask, cross_entropy, 0.0))
    return {"loss": loss_cfg.feature_weight * feature + loss_cfg.token_weight * token, "feature": feature,
            "token": token, "agree": jnp.sum(mask & agree).astype(jnp.float32),
            "count": jnp.sum(mask).astype(jnp.float32)}


def _split_target(target: Transformer):
    graphdef, params, rest = nnx.split(target, nnx.Param, ...)
    return graphdef, params, rest


def make_feature_train_step(head_def: nnx.GraphDef, target_def: nnx.GraphDef, loss_cfg: FeatureLossConfig,
                            tx: optax.GradientTransformation):
    """`step(head_params, opt_state, batch, target_params, target_rest, key) -> (head_params,
    opt_state, metric sums)`, jitted; the loss is the mean over the batch's valid positions."""

    def loss_fn(head_params, batch, target_params, target_rest, key):
        head = nnx.merge(head_def, head_params)
        target = nnx.merge(target_def, target_params, target_rest)
        sums = feature_loss_sums(head, target, batch, loss_cfg, key)
        return sums["loss"] / jnp.maximum(sums["count"], 1.0), sums

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(head_params, opt_state, batch, target_params, target_rest, key):
        grads, sums = jax.grad(loss_fn, has_aux=True)(head_params, batch, target_params, target_rest, key)
        updates, opt_state = tx.update(grads, opt_state, head_params)
        return optax.apply_updates(head_params, updates), opt_state, sums

    return step


def evaluate_feature_head(head: FeatureHead, target: Transformer, rows: PackedRows, batch_size: int,
                          max_batches: int | None = None, loss_cfg: FeatureLossConfig = FeatureLossConfig()) -> dict:
    """Mean loss terms and greedy agreement of `head` over `rows` (no noise): {"loss", "feature",
    "token", "agree"} as floats per valid position."""
    head_def, head_params = nnx.split(head)
    target_def, target_params, target_rest = _split_target(target)
    clean = dataclasses.replace(loss_cfg, input_noise=0.0)

    @jax.jit
    def sums(head_params, batch, target_params, target_rest):
        return feature_loss_sums(nnx.merge(head_def, head_params), nnx.merge(target_def, target_params, target_rest),
                                 batch, clean)

    total: dict[str, float] = {}
    for batch in eval_batches(rows, batch_size, max_batches):
        for k, v in jax.device_get(sums(head_params, batch, target_params, target_rest)).items():
            total[k] = total.get(k, 0.0) + float(v)
    count = max(total.pop("count", 0.0), 1.0)
    return {k: v / count for k, v in total.items()}


def train_feature_head(
    target: Transformer,
    train_rows: PackedRows,
    out: str | os.PathLike,
    *,
    train_cfg: TrainConfig,
    loss_cfg: FeatureLossConfig = FeatureLossConfig(),
    head_config: FeatureHeadConfig | None = None,
    val_rows: PackedRows | None = None,
    tokenizer: Tokenizer | None = None,
    save_dtype=None,
    metadata: dict | None = None,
    show_progress: bool = True,
    stop_after_seconds: float | None = None,
) -> dict:
    """Trains a fresh head for the frozen `target` and saves it under `out`/checkpoints.

    Args:
      target: the model whose features the head learns to predict (not changed).
      train_rows: packed training text in the target's tokens.
      out: run folder: checkpoints/ (the head, `save_feature_head`) and metrics.jsonl.
      train_cfg: steps, batch_size, seq_len of the rows, optimizer, schedule, seed, log_every,
        eval_every / eval_batches (with `val_rows`), checkpoint_every; grad_accum must be 1.
      loss_cfg: the EAGLE loss weights and input noise.
      head_config: default `FeatureHeadConfig.for_target(target.config)` with float32 parameters.
      val_rows: held-out rows for the evaluations.
      tokenizer: saved with the head (the target's).
      save_dtype: dtype the saved parameters are cast to (e.g. bfloat16); None keeps float32.
      metadata: more JSON-able values for the checkpoint's meta.json.
      show_progress: a tqdm bar (the `examples` extra).
      stop_after_seconds: end early (evaluating and saving as at the last step) once training has
        taken this long; the schedule keeps its length.

    Returns:
      a summary: step, params, loss (last logged), the final evaluation's val_* values, checkpoint.
    """
    if train_cfg.grad_accum != 1:
        raise ValueError(f"feature-head training takes one batch per step: {train_cfg.grad_accum=}")
    if train_rows.seq_len != train_cfg.seq_len:
        raise ValueError(f"rows of {train_rows.seq_len=} tokens, but {train_cfg.seq_len=}")
    head_config = head_config or FeatureHeadConfig.for_target(
        target.config, dtype=target.config.dtype, param_dtype=jnp.float32)
    head_config.check_target(target.config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head = FeatureHead(head_config, rngs=nnx.Rngs(train_cfg.seed))
    head_def, head_params = nnx.split(head)
    target_def, target_params, target_rest = _split_target(target)
    tx = make_optimizer(train_cfg)
    opt_state = tx.init(head_params)
    step_fn = make_feature_train_step(head_def, target_def, loss_cfg, tx)
    schedule = BatchSchedule(train_rows, train_cfg.batch_size, train_cfg.seed)
    lr = learning_rate_schedule(train_cfg)
    key = jax.random.key(train_cfg.seed)
    meta = {"train_config": train_cfg, "loss_config": loss_cfg, **(metadata or {})}
    summary: dict[str, Any] = {"params": count_params(head)}
    metrics_file = out / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)  # a run starts afresh: there is no resume to keep records for
    window: dict[str, float] = {}
    bar = progress.bar(train_cfg.steps, 0, show_progress, desc="feature head")
    start = time.perf_counter()

    def save(step: int) -> Path:
        nnx.update(head, head_params)
        return save_feature_head(head, out / "checkpoints", step=step, dtype=save_dtype, metadata=meta,
                                 tokenizer=tokenizer)

    for step in range(train_cfg.steps):
        key, sub = jax.random.split(key)
        head_params, opt_state, sums = step_fn(head_params, opt_state, schedule.batch(step), target_params,
                                               target_rest, sub)
        for k, v in jax.device_get(sums).items():
            window[k] = window.get(k, 0.0) + float(v)
        bar.update()
        done = step + 1
        last = done == train_cfg.steps or (
            stop_after_seconds is not None and time.perf_counter() - start > stop_after_seconds)
        if done % train_cfg.log_every == 0 or last:
            count = max(window.pop("count"), 1.0)
            record = {"step": done, "lr": float(lr(step)), "seconds": time.perf_counter() - start,
                      **{k: v / count for k, v in window.items()}}
            if not math.isfinite(record["loss"]):
                saved = sorted((out / "checkpoints").glob("step_*"))
                raise NonFiniteLossError(done, {"loss": record["loss"]}, saved[-1] if saved else None)
            append_metrics(metrics_file, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", agree=f"{record['agree']:.3f}")
            summary.update(step=done, loss=record["loss"], agree=record["agree"])
            window = {}
        if val_rows is not None and (done % train_cfg.eval_every == 0 or last):
            nnx.update(head, head_params)
            val = evaluate_feature_head(head, target, val_rows, train_cfg.batch_size, train_cfg.eval_batches,
                                        loss_cfg)
            append_metrics(metrics_file, {"step": done, **{f"val_{k}": v for k, v in val.items()}})
            summary.update({f"val_{k}": v for k, v in val.items()})
            bar.write(f"step {done}: " + " ".join(f"val_{k} {v:.4f}" for k, v in val.items()))
        if last:
            break
        if done % train_cfg.checkpoint_every == 0:
            save(done)
    bar.close()
    summary["checkpoint"] = str(save(done))
    return summary
