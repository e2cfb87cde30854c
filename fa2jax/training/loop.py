"""The training loop: `train` runs (or resumes) a run folder with checkpoints, metrics and a plot.

The loop checkpoints every N steps and at the end; the batch of step s is a pure function of s
(`fa2jax.data.BatchSchedule`), so `resume=True` continues bit-for-bit (on one device). With a
teacher it distils (`fa2jax.training.losses`) and reports the draft's speculative acceptance
against the teacher before and after, as `acceptance_sampled` / `acceptance_greedy`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fa2jax import checkpoint as ckpt
from fa2jax import sharding
from fa2jax.config import TransformerConfig
from fa2jax.data import BatchSchedule, PackedRows
from fa2jax.loading import load_pretrained
from fa2jax.tokenizer import Tokenizer
from fa2jax.training.metrics import (
    append_metrics, count_params, peak_flops, plot_loss_curve, read_metrics, training_flops_per_token,
    truncate_metrics)
from fa2jax.training.optimizer import make_optimizer
from fa2jax.training.presets import TrainConfig
from fa2jax.training.state import ModelParts, TrainState
from fa2jax.training.steps import evaluate, make_eval_step, make_train_step, measure_acceptance

# TrainConfig fields that do not change the arithmetic of training; a resumed run may change them.
_RESUME_FREE_FIELDS = frozenset({"eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                                 "log_every"})


def _check_resume(meta: dict, model_config: TransformerConfig, cfg: TrainConfig, rows: PackedRows) -> None:
    saved_model = meta["model_config"]
    if saved_model != ckpt.config_to_dict(model_config):
        raise ValueError(f"resume with a different model config: {saved_model=}")
    now = ckpt.config_to_dict(cfg)
    changed = {k: (v, now.get(k)) for k, v in meta["train_config"].items()
               if now.get(k) != v and k not in _RESUME_FREE_FIELDS}
    if changed:
        raise ValueError(f"resume would not continue the same run; (saved, now): {changed=}")
    if meta["data_fingerprint"] != rows.fingerprint():
        raise ValueError(f"resume on different training data: {meta['data_fingerprint']=} != "
                         f"{rows.fingerprint()=}")


def train(
    model_config: TransformerConfig,
    cfg: TrainConfig,
    train_rows: PackedRows,
    val_rows: PackedRows,
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    resume: bool = False,
    teacher: str | os.PathLike | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    stop_after_seconds: float | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """Trains (or continues training) a Transformer, writing checkpoints, metrics and a plot.

    Args:
      model_config: the model to train.
      cfg: training configuration; `cfg.seq_len` must equal the rows' T.
      train_rows, val_rows: packed data (`fa2jax.data.pack_documents`).
      out_dir: run folder: checkpoints/, metrics.jsonl, loss.png.
      tokenizer: saved into every checkpoint.
      resume: continue from the newest checkpoint in out_dir, if any (else start afresh).
      teacher: a model folder `fa2jax.load_pretrained` opens, with the same vocabulary, to distil from
        (requires cfg.distill_weight > 0 to change the loss; acceptance is reported either way).
      stop_at: leave the loop after this step (a checkpoint is written), as if killed there;
        the schedule still spans cfg.steps.
      progress: show a tqdm bar.
      stop_after_seconds: leave the loop (with a checkpoint) at the first logging step after this
        much wall time, so long runs fit in fixed-length jobs and continue with `resume`.
      mesh: train across its devices (`fa2jax.sharding.parse_mesh`): batch rows split over the
        data/fsdp axes, parameters and optimizer state placed by `fa2jax.sharding`'s rules.
        Checkpoints hold whole arrays, so a run may resume on another mesh or on one device.

    Returns:
      The last metrics: step, loss, val_loss, val_ppl, and acceptance rates with a teacher.
    """
    from tqdm.auto import tqdm

    if train_rows.seq_len != cfg.seq_len or val_rows.seq_len != cfg.seq_len:
        raise ValueError(f"rows must have T = {cfg.seq_len=}: {train_rows.seq_len=} {val_rows.seq_len=}")
    if cfg.seq_len > model_config.max_len:
        raise ValueError(f"{cfg.seq_len=} exceeds {model_config.max_len=}")
    if mesh is not None and cfg.batch_size % sharding.batch_shards(mesh):
        raise ValueError(f"{cfg.batch_size=} does not split over the {sharding.batch_shards(mesh)} batch shards of "
                         f"{dict(mesh.shape)=}")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)

    latest = ckpt.latest_checkpoint(ckpt_dir) if resume else None
    # Resuming needs only the shapes to load into: no initialisation of a model about to be replaced.
    parts = ModelParts.init(model_config, cfg.seed, abstract=latest is not None)
    tx = make_optimizer(cfg)
    init_opt = jax.eval_shape(tx.init, parts.params) if latest is not None else tx.init(parts.params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=parts.params, opt_state=init_opt)
    # From here the parameters live only in `state` (donated by each step).
    parts = dataclasses.replace(parts, params=None)
    schedule = BatchSchedule(train_rows, cfg.rows_per_step, seed=cfg.seed)

    teacher_parts = None
    if teacher is not None:
        teacher_parts = ModelParts.from_model(load_pretrained(teacher))
        if teacher_parts.config.vocab_size != model_config.vocab_size:
            raise ValueError(f"distillation needs one vocabulary: {teacher_parts.config.vocab_size=} != "
                             f"{model_config.vocab_size=}")
        if mesh is not None:
            teacher_parts = dataclasses.replace(teacher_parts, params=sharding.shard(teacher_parts.params, mesh))
    meta = {
        "model_config": ckpt.config_to_dict(model_config),
        "train_config": ckpt.config_to_dict(cfg),
        "data_fingerprint": train_rows.fingerprint(),
        "teacher": None if teacher is None else str(teacher),
    }

    summary: dict[str, Any] = {}
    if latest is not None:
        _check_resume(ckpt.read_metadata(latest), model_config, cfg, train_rows)
        # With a mesh each array is read straight into its shards.
        target = state.to_tree() if mesh is None else sharding.abstract_sharded(state.to_tree(), mesh)
        tree, saved_meta = ckpt.load_checkpoint(latest, target)
        state = TrainState(**tree)
        summary.update(saved_meta.get("summary", {}))
        truncate_metrics(metrics_path, int(state.step))
    else:
        metrics_path.unlink(missing_ok=True)
        if mesh is not None:
            state = sharding.shard(state, mesh)

    def acceptance(params):
        return measure_acceptance(parts, params, teacher_parts, val_rows, cfg.batch_size, cfg.eval_batches)

    if teacher_parts is not None and "acceptance_before" not in summary:
        before = acceptance(state.params)
        summary["acceptance_before"] = before
        append_metrics(metrics_path, {"step": int(state.step), **{f"{k}_before": v for k, v in before.items()}})

    train_step = make_train_step(parts, cfg, tx, teacher_parts, mesh=mesh)
    eval_step = make_eval_step(parts, mesh)
    t_params = teacher_parts.params if teacher_parts is not None else None
    t_rest = teacher_parts.rest if teacher_parts is not None else None
    flops_per_token = training_flops_per_token(model_config, count_params(state.params), cfg.seq_len)
    peak = peak_flops()

    def save(step):
        ckpt.save_checkpoint(ckpt_dir, step, state.to_tree(), {**meta, "summary": summary}, tokenizer,
                             keep=cfg.keep_checkpoints)

    start = int(state.step)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, dynamic_ncols=True)
    last = {"step": start}
    t0, interval = time.perf_counter(), []
    wall_start = t0
    for step in range(start, end):
        state, metrics = train_step(state, parts.rest, schedule.batch(step), t_params, t_rest)
        interval.append(metrics)  # device arrays: no wait here, steps keep queueing
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            host = jax.device_get(interval)  # waits for the last step to finish
            elapsed = time.perf_counter() - t0
            # Means over the interval (a single step's loss is noisy); the learning rate now.
            record = {"step": done, "epoch": schedule.epoch_of(step),
                      **{k: float(np.mean([m[k] for m in host])) for k in host[-1]},
                      "lr": float(host[-1]["lr"]),
                      "tokens_per_s": len(host) * cfg.tokens_per_step / elapsed}
            if peak is not None:
                record["mfu"] = record["tokens_per_s"] * flops_per_token / peak
            append_metrics(metrics_path, record)
            last.update(record)
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "tokens_per_s", "mfu") if k in record})
            t0, interval = time.perf_counter(), []
        # A run stopped for time reports the model it leaves: evaluated (and its acceptance
        # measured) at the stopping step, not at the last scheduled evaluation.
        out_of_time = (stop_after_seconds is not None and done % cfg.log_every == 0
                       and time.perf_counter() - wall_start > stop_after_seconds)
        if done % cfg.eval_every == 0 or done == end or out_of_time:
            ev = evaluate(parts, state.params, val_rows, cfg.batch_size, cfg.eval_batches, eval_step)
            append_metrics(metrics_path, {"step": done, **ev})
            last.update(ev)
            bar.write(f"step {done}: val_loss {ev['val_loss']:.4f}  val_ppl {ev['val_ppl']:.2f}")
            t0 = time.perf_counter()  # eval time is not training throughput
        if done % cfg.checkpoint_every == 0 or done == end or out_of_time:
            if (done == cfg.steps or out_of_time) and teacher_parts is not None:
                summary["acceptance_after"] = acceptance(state.params)
                append_metrics(metrics_path, {"step": done, **{f"{k}_after": v
                                                              for k, v in summary["acceptance_after"].items()}})
            save(done)
            t0 = time.perf_counter()
        if out_of_time:
            bar.write(f"stopping after {time.perf_counter() - wall_start:.0f} s at step {done}: resume to continue")
            break
    bar.close()
    if start >= end and ckpt.latest_checkpoint(ckpt_dir) is None:
        save(start)
    plot_loss_curve(read_metrics(metrics_path), out_dir / "loss.png")
    return {**last, **summary}
