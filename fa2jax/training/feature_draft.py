"""Training a `fa2jax.feature_head.FeatureHead` on a frozen target's features (EAGLE's recipe).

Per packed batch, the target runs once (no gradient) and gives its final hidden states f, and
its LM head their logits; the head reads (f_i, e(x_{i+1})) and predicts f^_{i+1}. The loss (Li et al., EAGLE,
ICML'24, §4.2) is

    feature_weight * smooth-L1(f^_{i+1}, f_{i+1}) + token_weight * CE(p_{i+2}, softmax(head(f^_{i+1})))

with p_{i+2} the target's own next-token distribution at position i + 1 (soft labels: the head is
graded on matching the target, not the text) and `head` the target's LM head, shared and frozen.
EAGLE weighs them 1 and 0.1. Uniform noise of amplitude `input_noise` on the input features
(EAGLE's augmentation) teaches the head to read its own, imperfect predictions at deeper levels;
`unroll_steps` > 1 goes further and trains it on them: the head runs again on its own predictions
(EAGLE-3's "training-time test", HASS), each pass adding its loss (`feature_loss_sums`).
Only positions whose next token lies in the same document count (`losses.target_mask`).
A head with `feature_layers` (EAGLE-3's fused features) reads the target's inner layers as well:
its first pass reads `head.read_target` of them all, the regression target stays the final state.

The target is frozen, so its features can be computed once per corpus (`target_features`, in
big jitted batches) and handed to the training as `train_features`: a step then reads them
from device memory (a batch's "hidden") and runs only the target's LM head for its soft labels,
not its whole stack; over many epochs that is most of the work saved.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fa2jax.data import BatchSchedule, PackedRows, eval_batches
from fa2jax.feature_head import FeatureHead, FeatureHeadConfig, count_params, save_feature_head, widen_head
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
    """Weights of the EAGLE loss, the input augmentation and the unrolled passes.

    Attributes:
      feature_weight: weight of the smooth-L1 regression onto the target's next feature.
      token_weight: weight of the cross entropy against the target's next-token distribution.
      input_noise: amplitude a of the U(-a, a) noise added to the target's features the head reads.
      unroll_steps: passes of the head per batch (a "training-time test", EAGLE-3 / HASS): pass 1
        reads the target's features; pass k >= 2 reads the head's own predictions of pass k - 1,
        as the head does below the first level of a draft tree. 1 is EAGLE's one-pass loss.
      unroll_weight: pass k's loss counts unroll_weight ** (k - 1) times.
      unroll_gradient: let the gradient of pass k flow back through the predictions it reads
        (HASS keeps it). Off by default: pass k then only teaches the head to read imperfect
        predictions, it cannot pull pass k - 1's predictions away from the target's features to make
        them easier to read, and the backward pass costs one head pass per pass.
    """

    feature_weight: float = 1.0
    token_weight: float = 0.1
    input_noise: float = 0.0
    unroll_steps: int = 1
    unroll_weight: float = 1.0
    unroll_gradient: bool = False

    def __post_init__(self):
        for name in ("feature_weight", "token_weight", "input_noise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
        if self.feature_weight == self.token_weight == 0:
            raise ValueError(f"the loss needs a positive weight: {self.feature_weight=} {self.token_weight=}")
        if not (isinstance(self.unroll_steps, int) and not isinstance(self.unroll_steps, bool)
                and self.unroll_steps >= 1):
            raise ValueError(f"unroll_steps must be an int >= 1, got {self.unroll_steps=}")
        if not (isinstance(self.unroll_weight, (int, float)) and math.isfinite(self.unroll_weight)
                and self.unroll_weight > 0):
            raise ValueError(f"unroll_weight must be a finite number > 0, got {self.unroll_weight=}")


def feature_loss_sums(head: FeatureHead, target: Transformer, batch: dict, loss_cfg: FeatureLossConfig,
                      key: jax.Array | None = None) -> dict:
    """The EAGLE loss terms of one packed batch, summed over the valid positions.

    With `loss_cfg.unroll_steps` = k > 1 the head runs k times (EAGLE-3's "training-time test",
    HASS): pass 1 as always; pass j >= 2 reads, at position i, the feature its pass j - 1 predicted
    there (pass j - 1's output at i - 1), the same embeddings e(x_{i+1}), and is graded against the
    same f_{i+1} and next-token distribution. Where that prediction would come from another document
    (or i = 0) the position reads pass 1's input instead, so no document sees another through the
    head's attention; pass j's loss counts only positions whose chain of j predictions stays in one
    document (a depth-j prediction). A simplification of draft time: there the head attends to
    the target's true features of the context and reads its own only along the drafted branch;
    here every position of pass j reads predicted ones.

    Args:
      head: the head (its parameters are what a gradient would be taken of).
      target: the frozen target; its outputs are cut from the gradient.
      batch: "tokens", "segment_ids", "positions".  # [B, T] int32 each
        Optionally "hidden": the target's hidden states of these tokens, precomputed
        (`target_features` with the head's `feature_layers`), so the target's stack does not
        run.  # [B, T, target_width]
      loss_cfg: weights, noise and unrolled passes.
      key: PRNG key of the input noise (unused when `input_noise` is 0).

    Returns:
      {"loss", "feature", "token", "agree", "count"}: [] float32 sums; "agree" counts positions
      where the head's argmax on its predicted feature equals the target's next-token argmax (the
      depth-1 greedy acceptance with the target's own context features). Divide by "count".
      "loss" sums every pass's weighted terms; the others are pass 1's, comparable across
      unroll_steps. With unroll_steps > 1 also "agree_k" and "count_k": the last pass's agreement
      and its positions (divide one by the other: the depth-k agreement, each position graded on
      its own, not conditioned on the levels above it being accepted).
    """
    tokens, segments, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
    wide = batch.get("hidden")
    if wide is None:
        _, wide = target(tokens, segments, positions, return_hidden=True,
                         hidden_layers=head.config.feature_layers)  # [B, T, target_width]
    wide = jax.lax.stop_gradient(wide)
    hidden = wide[..., -head.config.d_model:]  # the final hidden states f  [B, T, d]
    # The target's logits of x_{i+2}: its LM head on f_{i+1} (what its forward computes there).
    logits = jax.lax.stop_gradient(target.head_logits(hidden[:, 1:], mask_padding=False))  # [B, T-1, V]
    p = jax.nn.softmax(logits, -1)  # the target's distribution of x_{i+2}
    target_argmax = jnp.argmax(logits, -1)  # [B, T-1]
    features = wide[:, :-1]  # f_i (with the inner layers' outputs before it)  [B, T-1, target_width]
    if loss_cfg.input_noise > 0:
        noise = jax.random.uniform(key, features.shape, jnp.float32, -loss_cfg.input_noise, loss_cfg.input_noise)
        features = (features.astype(jnp.float32) + noise).astype(features.dtype)
    features = head.read_target(features)  # [B, T-1, d]
    embeddings = jax.lax.stop_gradient(target.embed_tokens(tokens[:, 1:]))  # e(x_{i+1})  [B, T-1, d]
    head_segments, head_positions = segments[:, :-1], positions[:, :-1]  # [B, T-1]

    def pass_sums(predicted, mask):  # predicted f^_{i+1} [B, T-1, d], mask [B, T-1] -> [] sums
        err = predicted.astype(jnp.float32) - hidden[:, 1:].astype(jnp.float32)
        smooth_l1 = optax.huber_loss(err, delta=1.0).mean(-1)  # [B, T-1]
        log_q = jax.nn.log_softmax(target.head_logits(predicted, mask_padding=False), -1)  # [B, T-1, V]
        cross_entropy = -jnp.sum(p * log_q, -1)  # [B, T-1]
        agree = jnp.argmax(log_q, -1) == target_argmax
        return {"feature": jnp.sum(jnp.where(mask, smooth_l1, 0.0)),
                "token": jnp.sum(jnp.where(mask, cross_entropy, 0.0)),
                "agree": jnp.sum(mask & agree).astype(jnp.float32), "count": jnp.sum(mask).astype(jnp.float32)}

    def weighted(sums):
        return loss_cfg.feature_weight * sums["feature"] + loss_cfg.token_weight * sums["token"]

    mask = target_mask(segments)  # [B, T-1]: f_{i+1} is in x_i's document
    predicted = head(features, embeddings, head_segments, head_positions)  # f^_{i+1}  [B, T-1, d]
    first = pass_sums(predicted, mask)
    out = {"loss": weighted(first), **first}
    # Position i may read the prediction made at i - 1 (of f_i) when x_{i-1} and x_i share a document.
    fed_back = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))  # [B, T-1]
    valid = mask  # depth-j predictions: the last j positions' targets all in one document
    for j in range(2, loss_cfg.unroll_steps + 1):
        if not loss_cfg.unroll_gradient:
            predicted = jax.lax.stop_gradient(predicted)
        shifted = jnp.pad(predicted[:, :-1], ((0, 0), (1, 0), (0, 0))).astype(features.dtype)  # [B, T-1, d]
        inputs = jnp.where(fed_back[..., None], shifted, features)
        valid = valid & jnp.pad(valid[:, :-1], ((0, 0), (1, 0)))
        predicted = head(inputs, embeddings, head_segments, head_positions)
        last = pass_sums(predicted, valid)
        out["loss"] = out["loss"] + loss_cfg.unroll_weight ** (j - 1) * weighted(last)
        out["agree_k"], out["count_k"] = last["agree"], last["count"]
    return out


def per_position(sums: dict) -> dict:
    """Metric sums (`feature_loss_sums`'s, or several batches' added) as floats per valid
    position: "agree_k" over "count_k", every other value over "count"; the counts are dropped."""
    sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    count, count_k = max(sums.pop("count", 0.0), 1.0), max(sums.pop("count_k", 0.0), 1.0)
    return {k: v / (count_k if k == "agree_k" else count) for k, v in sums.items()}


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


def target_features(target: Transformer, rows: PackedRows, batch_size: int, dtype=None,
                    hidden_layers: tuple[int, ...] = (), on_host: bool = False) -> jax.Array | np.ndarray:
    """The frozen target's final hidden states of every row, computed in jitted batches and kept
    on the device (`train_feature_head`'s `train_features`).

    Args:
      target: the model.
      rows: packed rows.  # [N, T]
      batch_size: rows per forward pass (the last pass is padded to it: one compiled shape).
      dtype: storage dtype; default the target's compute dtype.
      hidden_layers: inner layers whose outputs come first (a head's `feature_layers`).
      on_host: return a NumPy array in host memory instead (filled batch by batch, never whole on
        the device): for fused features, several times the final states' size, that would not fit
        beside the training. A step then copies its rows' features to the device.

    Returns:
      features.  # [N, T, (len(hidden_layers) + 1) * d] on the default device (or host)
    """
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be positive")
    graphdef, params, rest = _split_target(target)
    dtype = jnp.dtype(dtype or target.config.dtype)

    @jax.jit
    def forward(params, rest, batch):
        _, hidden = nnx.merge(graphdef, params, rest)(batch["tokens"], batch["segment_ids"], batch["positions"],
                                                     return_hidden=True, hidden_layers=hidden_layers)
        return hidden.astype(dtype)

    parts, host = [], None
    for lo, batch in zip(range(0, rows.num_rows, batch_size), eval_batches(rows, batch_size)):
        part = forward(params, rest, batch)[: rows.num_rows - lo]
        if not on_host:
            parts.append(part)
            continue
        if host is None:  # allocated once: concatenating host parts would hold the features twice
            host = np.empty((rows.num_rows, *part.shape[1:]), part.dtype)
        host[lo: lo + part.shape[0]] = np.asarray(part)
    return host if on_host else jnp.concatenate(parts, axis=0)


def _step_batch(schedule: BatchSchedule, step: int, features: jax.Array | None) -> dict:
    """The batch of optimizer step `step`, with its rows' precomputed features when given."""
    index = schedule.indices(step)
    rows = schedule.rows
    batch = {"tokens": rows.tokens[index], "segment_ids": rows.segment_ids[index], "positions": rows.positions[index]}
    return _with_features(batch, features, index)


def _with_features(batch: dict, features: jax.Array | None, index: np.ndarray) -> dict:
    """`batch` plus "hidden" = features[index] (gathered on the device, or on the host and copied
    over for host features), zeros for padding rows."""
    if features is None:
        return batch
    hidden = jnp.asarray(features[index]) if isinstance(features, np.ndarray) else features[jnp.asarray(index)]
    short = batch["tokens"].shape[0] - hidden.shape[0]
    if short:
        hidden = jnp.pad(hidden, ((0, short), (0, 0), (0, 0)))
    return {**batch, "hidden": hidden}


def evaluate_feature_head(head: FeatureHead, target: Transformer, rows: PackedRows, batch_size: int,
                          max_batches: int | None = None, loss_cfg: FeatureLossConfig = FeatureLossConfig(),
                          features: jax.Array | None = None) -> dict:
    """Mean loss terms and greedy agreement of `head` over `rows` (no noise): {"loss", "feature",
    "token", "agree"} (and "agree_k" when unrolled) as floats per valid position (`per_position`).
    `features`: the target's, precomputed (`target_features` of `rows`), so that only its LM head runs."""
    head_def, head_params = nnx.split(head)
    target_def, target_params, target_rest = _split_target(target)
    clean = dataclasses.replace(loss_cfg, input_noise=0.0)

    @jax.jit
    def sums(head_params, batch, target_params, target_rest):
        return feature_loss_sums(nnx.merge(head_def, head_params), nnx.merge(target_def, target_params, target_rest),
                                 batch, clean)

    total = None
    for lo, batch in zip(range(0, rows.num_rows, batch_size), eval_batches(rows, batch_size, max_batches)):
        index = np.arange(lo, min(lo + batch_size, rows.num_rows))
        out = sums(head_params, _with_features(batch, features, index), target_params, target_rest)
        total = out if total is None else jax.tree.map(jnp.add, total, out)  # on the device: no sync per batch
    return per_position(total)


def _seconds_per_step(step_fn, head_params, opt_state, schedule: BatchSchedule, features, target_params,
                      target_rest, probes: int) -> tuple[float, float]:
    """(compile + first step seconds, seconds per step after it) of `step_fn` on copies of the state
    (the step donates its inputs), timed over `probes` steps."""
    head_params, opt_state = jax.tree.map(jnp.copy, (head_params, opt_state))
    key = jax.random.key(0)

    def run(step):
        return step_fn(head_params, opt_state, _step_batch(schedule, step, features), target_params, target_rest, key)

    start = time.perf_counter()
    head_params, opt_state, sums = run(0)
    jax.block_until_ready(sums)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(1, probes + 1):
        head_params, opt_state, sums = run(step)
    jax.block_until_ready(sums)
    return first, (time.perf_counter() - start) / probes


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
    train_features: jax.Array | None = None,
    val_features: jax.Array | None = None,
    time_budget: float | None = None,
    checkpoint_seconds: float | None = None,
    on_log: Callable[[dict], None] | None = None,
    init_head: FeatureHead | None = None,
) -> dict:
    """Trains a head for the frozen `target` (fresh, or from `init_head`) and saves it under `out`/checkpoints.

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
      stop_after_seconds: end early (evaluating and saving as at the last step) once this call has
        taken this long; the schedule keeps its length.
      train_features, val_features: the target's features of `train_rows` / `val_rows`
        (`target_features` with the head's `feature_layers`); a step then runs the target's LM
        head only, not its stack.  # [N, T, target_width]
      time_budget: seconds the whole call may take: the step count (so the schedule's length;
        train_cfg.steps becomes an upper bound) is set from the time of a few steps of a throwaway
        copy, so the cosine decay ends when the time does. Its warmup is capped below the steps.
      checkpoint_seconds: also save whenever this long has passed since the last save (a run
        killed from outside keeps its latest head).
      on_log: called with each logged record ({"step", "lr", "seconds", "loss", ...}, and the
        {"step", "val_*"} records of the evaluations), e.g. to print progress.
      init_head: start from this trained head's weights instead of fresh ones
        (`fa2jax.feature_head.widen_head`: a plain head may start a fused one).

    Returns:
      a summary: step, params, loss (last logged), the final evaluation's val_* values, checkpoint.
    """
    start = time.perf_counter()
    if train_cfg.grad_accum != 1:
        raise ValueError(f"feature-head training takes one batch per step: {train_cfg.grad_accum=}")
    if train_rows.seq_len != train_cfg.seq_len:
        raise ValueError(f"rows of {train_rows.seq_len=} tokens, but {train_cfg.seq_len=}")
    head_config = head_config or FeatureHeadConfig.for_target(
        target.config, dtype=target.config.dtype, param_dtype=jnp.float32)
    head_config.check_target(target.config)
    for name, rows, features in (("train", train_rows, train_features), ("val", val_rows, val_features)):
        if features is not None and (rows is None or features.shape != (*rows.tokens.shape, head_config.target_width)):
            raise ValueError(f"{name}_features must be [N, T, {head_config.target_width}] (the head's target_width) "
                             f"of the {name} rows: {features.shape=}, rows {None if rows is None else rows.tokens.shape}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head = (FeatureHead(head_config, rngs=nnx.Rngs(train_cfg.seed)) if init_head is None
            else widen_head(init_head, head_config, rngs=nnx.Rngs(train_cfg.seed)))
    head_def, head_params = nnx.split(head)
    target_def, target_params, target_rest = _split_target(target)
    schedule = BatchSchedule(train_rows, train_cfg.batch_size, train_cfg.seed)
    summary: dict[str, Any] = {"params": count_params(head)}
    if time_budget is not None:
        tx = make_optimizer(train_cfg)
        first, per_step = _seconds_per_step(make_feature_train_step(head_def, target_def, loss_cfg, tx), head_params,
                                            tx.init(head_params), schedule, train_features, target_params,
                                            target_rest, probes=5)
        # The real step compiles again (its schedule differs); the end compiles and runs an evaluation
        # (forward only: counted as another compilation and two steps a batch) and saves.
        left = time_budget - (time.perf_counter() - start) - 2 * first - 2 * train_cfg.eval_batches * per_step
        steps = max(2, min(train_cfg.steps, int(0.95 * left / per_step)))
        train_cfg = dataclasses.replace(train_cfg, steps=steps,
                                        warmup_steps=min(train_cfg.warmup_steps, steps // 10))
        summary.update(planned_steps=steps, probe_seconds_per_step=per_step, probe_first_step_seconds=first)
        if on_log is not None:
            on_log({"step": 0, "planned_steps": steps, "seconds_per_step": per_step, "compile_seconds": first})
    tx = make_optimizer(train_cfg)
    opt_state = tx.init(head_params)
    step_fn = make_feature_train_step(head_def, target_def, loss_cfg, tx)
    lr = learning_rate_schedule(train_cfg)
    key = jax.random.key(train_cfg.seed)
    meta = {"train_config": train_cfg, "loss_config": loss_cfg, **(metadata or {})}
    metrics_file = out / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)  # a run starts afresh: there is no resume to keep records for
    window = None  # metric sums since the last log, on the device: fetched at log time only
    bar = progress.bar(train_cfg.steps, 0, show_progress, desc="feature head")
    train_start, last_save = start, time.perf_counter()  # stop_after_seconds counts the probe steps too

    def save(step: int) -> Path:
        nnx.update(head, head_params)
        return save_feature_head(head, out / "checkpoints", step=step, dtype=save_dtype, metadata=meta,
                                 tokenizer=tokenizer)

    for step in range(train_cfg.steps):
        key, sub = jax.random.split(key)
        head_params, opt_state, sums = step_fn(head_params, opt_state, _step_batch(schedule, step, train_features),
                                               target_params, target_rest, sub)
        window = sums if window is None else jax.tree.map(jnp.add, window, sums)
        bar.update()
        done = step + 1
        last = done == train_cfg.steps or (
            stop_after_seconds is not None and time.perf_counter() - train_start > stop_after_seconds)
        if done % train_cfg.log_every == 0 or last:
            record = {"step": done, "lr": float(lr(step)), "seconds": time.perf_counter() - train_start,
                      "epoch": done / schedule.batches_per_epoch, **per_position(window)}
            if not math.isfinite(record["loss"]):
                saved = sorted((out / "checkpoints").glob("step_*"))
                raise NonFiniteLossError(done, {"loss": record["loss"]}, saved[-1] if saved else None)
            append_metrics(metrics_file, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", agree=f"{record['agree']:.3f}",
                            **({"agree_k": f"{record['agree_k']:.3f}"} if "agree_k" in record else {}))
            summary.update(step=done, loss=record["loss"], agree=record["agree"],
                           **({"agree_k": record["agree_k"]} if "agree_k" in record else {}))
            if on_log is not None:
                on_log(record)
            window = None
        if val_rows is not None and (done % train_cfg.eval_every == 0 or last):
            nnx.update(head, head_params)
            val = evaluate_feature_head(head, target, val_rows, train_cfg.batch_size, train_cfg.eval_batches,
                                        loss_cfg, features=val_features)
            record = {"step": done, **{f"val_{k}": v for k, v in val.items()}}
            append_metrics(metrics_file, record)
            summary.update(record)
            bar.write(f"step {done}: " + " ".join(f"val_{k} {v:.4f}" for k, v in val.items()))
            if on_log is not None:
                on_log(record)
        if last:
            break
        if done % train_cfg.checkpoint_every == 0 or (
                checkpoint_seconds is not None and time.perf_counter() - last_save > checkpoint_seconds):
            save(done)
            last_save = time.perf_counter()
    bar.close()
    summary["checkpoint"] = str(save(done))
    summary["train_seconds"] = time.perf_counter() - train_start
    return summary
