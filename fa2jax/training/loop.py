"""The training loop: `train` runs (or resumes) a run folder with checkpoints, metrics and a plot.

The loop checkpoints every N steps and at the end (`fa2jax.checkpoint.CheckpointStore`: async,
checked, rotation that keeps the last good one); the batch of step s is a pure function of s
(`fa2jax.data.BatchSchedule`), so `resume=True` continues bit-for-bit (on one device) when the
settings are unchanged. A resume may extend `steps` and change the optimizer, loss-weighting and
bookkeeping settings; what would change the parameters' shapes or the data a step sees is refused.

Faults: a non-finite loss or gradient norm stops the run at once with `NonFiniteLossError` (each
step's loss is read while the next step runs, so the device never idles for it) and nothing of that
state is saved. SIGTERM and SIGINT make the loop checkpoint the current step and return (a second
signal kills as usual). A corrupt newest checkpoint is reported and the run resumes from the newest
intact one. With a teacher it distils (`fa2jax.training.losses`) and reports the draft's
speculative acceptance against the teacher before and after, as `acceptance_sampled` /
`acceptance_greedy`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
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
from fa2jax.training import progress as progress_ui
from fa2jax.training.metrics import (
    append_metrics, count_params, peak_flops, plot_loss_curve, read_metrics, training_flops_per_token,
    truncate_metrics)
from fa2jax.training.optimizer import make_optimizer
from fa2jax.training.presets import TrainConfig
from fa2jax.training.state import ModelParts, TrainState
from fa2jax.training.steps import evaluate, make_eval_step, make_train_step, measure_acceptance

# TransformerConfig fields a resumed run may change: they touch neither the parameters' shapes nor
# what the parameters mean (compute dtype, attention backend, longest sequence).
RESUME_FREE_MODEL_FIELDS = frozenset({"max_len", "dtype", "attention_impl", "invariant_rows"})
# TrainConfig fields a resumed run must keep: they fix which rows step s trains on.
RESUME_FIXED_TRAIN_FIELDS = ("seed", "seq_len")


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) of a step was NaN or infinite; the run stopped without saving."""

    def __init__(self, step: int, values: dict[str, float], checkpoint: Path | None):
        self.step, self.values, self.checkpoint = step, values, checkpoint
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        where = (f"the newest checkpoint is {str(checkpoint)!r}" if checkpoint is not None
                 else "no checkpoint was written")
        super().__init__(f"non-finite loss at step {step}: {shown}; stopped without saving ({where}; "
                         f"continue from it with resume and saner settings, e.g. a lower learning rate)")


def _check_finite(step: int, metrics: dict, store: ckpt.CheckpointStore) -> None:
    """Raises NonFiniteLossError if the host `metrics` of `step` hold a non-finite loss or norm."""
    values = {k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics}
    if not all(math.isfinite(v) for v in values.values()):
        store.wait()
        steps = store.steps()
        raise NonFiniteLossError(step, values, store.path(steps[-1]) if steps else None)


def check_resume(meta: dict, model_config: TransformerConfig, cfg: TrainConfig, start: int) -> None:
    """Raises a ValueError naming the field if `model_config` / `cfg` cannot continue the run of `meta`.

    Args:
      meta: the metadata of the checkpoint resumed from.
      start: its step.
    """
    saved_model = ckpt.config_to_dict(ckpt.model_config_from_dict(meta["model_config"]))
    now_model = ckpt.config_to_dict(model_config)
    for name in sorted(set(saved_model) | set(now_model)):
        if name not in RESUME_FREE_MODEL_FIELDS and saved_model.get(name) != now_model.get(name):
            raise ValueError(f"a resumed run keeps its model: {name}={now_model.get(name)!r} differs from the "
                             f"checkpoint's {name}={saved_model.get(name)!r}")
    saved_train = ckpt.config_from_dict(TrainConfig, meta["train_config"])
    for name in RESUME_FIXED_TRAIN_FIELDS:
        if getattr(saved_train, name) != getattr(cfg, name):
            raise ValueError(f"a resumed run keeps the data of each step: {name}={getattr(cfg, name)!r} differs "
                             f"from the checkpoint's {name}={getattr(saved_train, name)!r}")
    if saved_train.rows_per_step != cfg.rows_per_step:
        raise ValueError(f"a resumed run keeps the rows per step: {cfg.batch_size=} x {cfg.grad_accum=} differs from "
                         f"the checkpoint's {saved_train.batch_size} x {saved_train.grad_accum} (the split between "
                         f"the two may change)")
    if cfg.steps < start:
        raise ValueError(f"{cfg.steps=} is below step {start}, where the run resumes")


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[dict]:
    """Yields {"signal": None}; SIGTERM / SIGINT set it to the signal's name (and restore the
    previous handlers, so a second signal acts as usual). Off the main thread, or when not
    enabled, no handler is installed."""
    state: dict[str, str | None] = {"signal": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield state
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def handle(signum, frame):
        state["signal"] = signal.Signals(signum).name
        for s, h in previous.items():
            signal.signal(s, h)

    for s in signals:
        signal.signal(s, handle)
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _newest_metadata(ckpt_dir: Path) -> tuple[dict, Path] | None:
    """(metadata, folder) of the newest checkpoint whose metadata reads, or None."""
    for _, path in reversed(ckpt.list_checkpoints(ckpt_dir)):
        try:
            return ckpt.read_metadata(path), path
        except (OSError, ValueError):
            continue
    return None


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
    handle_signals: bool = True,
    mesh: Mesh | None = None,
) -> dict:
    """Trains (or continues training) a Transformer, writing checkpoints, metrics and a plot.

    Args:
      model_config: the model to train.
      cfg: training configuration; `cfg.seq_len` must equal the rows' T.
      train_rows, val_rows: packed data (`fa2jax.data.pack_documents`).
      out_dir: run folder: checkpoints/, metrics.jsonl, loss.png.
      tokenizer: saved into every checkpoint.
      resume: continue from the newest intact checkpoint in out_dir (an error if there is none).
        `cfg.steps` may be larger than the run's (the schedule is stretched to it); the optimizer,
        distillation and bookkeeping settings may change; see `check_resume` for what may not.
      teacher: a model folder `fa2jax.load_pretrained` opens, with the same vocabulary, to distil from
        (requires cfg.distill_weight > 0 to change the loss; acceptance is reported either way).
      stop_at: leave the loop after this step (a checkpoint is written), as if killed there;
        the schedule still spans cfg.steps.
      progress: show progress bars (tqdm is imported only then).
      stop_after_seconds: leave the loop (with a checkpoint) at the first logging step after this
        much wall time, so long runs fit in fixed-length jobs and continue with `resume`.
      handle_signals: on SIGTERM / SIGINT, checkpoint the current step and return (main thread only).
      mesh: train across its devices (`fa2jax.sharding.parse_mesh`): batch rows split over the
        data/fsdp axes, the sequence over a context axis (ring attention), parameters and
        optimizer state placed by `fa2jax.sharding`'s rules.
        Checkpoints are restored straight into the shards of the mesh the run resumes on, which
        may differ from the one that saved them (or be none).

    Returns:
      The last metrics: step, loss, val_loss, val_ppl, acceptance rates with a teacher, and
      `stopped_by` (the signal's name) when a signal ended the run.

    Raises:
      NonFiniteLossError: a step's loss or gradient norm was not finite (nothing of it is saved).
      fa2jax.checkpoint.CheckpointError: resume with no checkpoint, or with none intact; or a new
        run in a folder that holds checkpoints.
      ValueError: inconsistent settings, or a resume that would change the model or the data.
    """
    show = progress
    if train_rows.seq_len != cfg.seq_len or val_rows.seq_len != cfg.seq_len:
        raise ValueError(f"rows must have T = {cfg.seq_len=}: {train_rows.seq_len=} {val_rows.seq_len=}")
    if cfg.seq_len > model_config.max_len:
        raise ValueError(f"{cfg.seq_len=} exceeds {model_config.max_len=}")
    if mesh is not None and cfg.batch_size % sharding.batch_shards(mesh):
        raise ValueError(f"{cfg.batch_size=} does not split over the {sharding.batch_shards(mesh)} batch shards of "
                         f"{dict(mesh.shape)=}")
    if mesh is not None and cfg.seq_len % (2 * sharding.context_shards(mesh)):
        raise ValueError(f"{cfg.seq_len=} does not split into two zig-zag pieces on each of the "
                         f"{sharding.context_shards(mesh)} devices of the context axis of {dict(mesh.shape)=}")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)

    newest = _newest_metadata(ckpt_dir)
    if resume and newest is None:
        raise ckpt.CheckpointError(f"nothing to resume: no checkpoint in {str(ckpt_dir)!r}")
    if not resume and ckpt.list_checkpoints(ckpt_dir):
        raise ckpt.CheckpointError(f"{str(ckpt_dir)!r} holds the checkpoints of an earlier run: resume it, or "
                                   f"train in another folder")
    if resume:
        saved_meta, _ = newest
        check_resume(saved_meta, model_config, cfg, saved_meta["step"])
        if saved_meta.get("data_fingerprint") not in (None, train_rows.fingerprint()):
            raise ValueError(f"resume on different training data: {saved_meta['data_fingerprint']=} != "
                             f"{train_rows.fingerprint()=}")

    # Resuming needs only the shapes to load into: no initialisation of a model about to be replaced.
    parts = ModelParts.init(model_config, cfg.seed, abstract=resume)
    tx = make_optimizer(cfg)
    init_opt = jax.eval_shape(tx.init, parts.params) if resume else tx.init(parts.params)
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

    store = ckpt.CheckpointStore(ckpt_dir, keep=cfg.keep_checkpoints)
    with contextlib.closing(store), _stop_on_signals(handle_signals) as stop:
        if store.removed_temporaries:
            print(f"removed the temporary folders of unfinished saves in {ckpt_dir}: {store.removed_temporaries}")
        summary: dict[str, Any] = {}
        if resume:
            # With a mesh each array is read straight into its shards.
            target = state.to_tree() if mesh is None else sharding.abstract_sharded(state.to_tree(), mesh)
            restored = store.restore_newest(target)
            for e in restored.skipped:
                print(f"{e}; moved it aside to {e.moved_to.name} and fell back to an older checkpoint")
            state = TrainState(**restored.state)
            summary.update(restored.metadata.get("summary", {}))
            truncate_metrics(metrics_path, int(state.step))
            print(f"resuming from {restored.path} (step {int(state.step)}) to step {cfg.steps}")
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
        start = int(state.step)
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        last_saved = start if resume else None

        def save(done):
            nonlocal last_saved
            if done != last_saved:
                store.save(done, state.to_tree(), {**meta, "summary": summary}, tokenizer)
                last_saved = done

        def check(done, metrics):
            _check_finite(done, jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")}), store)

        print(f"training steps {start + 1}..{end} of {cfg.steps}" if start < end else f"no steps to train: at step "
              f"{start} of {cfg.steps}", flush=True)
        bar = progress_ui.Plain()
        last = {"step": start}
        interval, previous = [], None
        wall_start = t0 = time.perf_counter()
        for step in range(start, end):
            if step == start:  # the first call compiles (and autotunes the attention kernels on a GPU)
                with progress_ui.phase("compiling the train step", show):
                    state, metrics = train_step(state, parts.rest, schedule.batch(step), t_params, t_rest)
                bar = progress_ui.bar(cfg.steps, start, show)
            else:
                state, metrics = train_step(state, parts.rest, schedule.batch(step), t_params, t_rest)
            done = step + 1
            # The previous step has finished, or nearly (this one is queued behind it): its loss is
            # read without idling the device.
            if previous is not None:
                check(*previous)
            previous = (done, metrics)
            interval.append(metrics)  # device arrays: no wait here, steps keep queueing
            bar.update(1)
            signalled = stop["signal"] is not None
            if done % cfg.log_every == 0 or done == end or signalled:
                host = jax.device_get(interval)  # waits for the last step to finish
                for i, m in enumerate(host):
                    _check_finite(done - len(host) + 1 + i, m, store)
                previous = None
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
            # measured) at the stopping step, not at the last scheduled evaluation. A signal asks
            # for a quick exit: only the checkpoint.
            out_of_time = (stop_after_seconds is not None and done % cfg.log_every == 0
                           and time.perf_counter() - wall_start > stop_after_seconds)
            if not signalled and (done % cfg.eval_every == 0 or done == end or out_of_time):
                check(done, metrics)
                ev = evaluate(parts, state.params, val_rows, cfg.batch_size, cfg.eval_batches, eval_step)
                append_metrics(metrics_path, {"step": done, **ev})
                last.update(ev)
                bar.write(f"step {done}: val_loss {ev['val_loss']:.4f}  val_ppl {ev['val_ppl']:.2f}")
                t0 = time.perf_counter()  # eval time is not training throughput
            if done % cfg.checkpoint_every == 0 or done == end or out_of_time or signalled:
                check(done, metrics)
                if (done == cfg.steps or out_of_time) and teacher_parts is not None and not signalled:
                    summary["acceptance_after"] = acceptance(state.params)
                    append_metrics(metrics_path, {"step": done, **{f"{k}_after": v
                                                                  for k, v in summary["acceptance_after"].items()}})
                save(done)
                t0 = time.perf_counter()
            if out_of_time:
                bar.write(f"stopping after {time.perf_counter() - wall_start:.0f} s at step {done}: resume to continue")
                break
            if signalled:
                store.wait()
                bar.write(f"stopped by {stop['signal']} at step {done}: saved {store.path(done)}; resume to continue")
                summary["stopped_by"] = stop["signal"]
                break
        bar.close()
        if start >= end and not store.steps():
            save(start)
    plot_loss_curve(read_metrics(metrics_path), out_dir / "loss.png")
    return {**last, **summary}
