"""The jitted steps: one optimizer step (micro-batches scanned, optional distillation), one
evaluation batch, and the passes over validation batches built on them.

Context parallelism (a mesh with a "context" axis of n > 1 devices): each batch is put in the
zig-zag token order of ring attention once, inside the step, with every position's next-token
target and mask found first in token order and permuted alike (`token_layout`); the model then
keeps that order and the loss is a sum over positions, so neither logits nor targets move between
devices.

Precision: parameters and optimizer state in the model config's `param_dtype` (float32), the
forward/backward pass in its `dtype` (bfloat16 on GPU), logits in float32. The loss is averaged
over the valid targets of all micro-batches of a step, so gradient accumulation gives the same
update as one big batch.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fa2jax import sharding
from fa2jax.data import PackedRows, eval_batches
from fa2jax.training.losses import (
    acceptance_sums, next_token_targets, token_cross_entropy_sum, token_distillation_kl_sum)
from fa2jax.training.optimizer import learning_rate_schedule
from fa2jax.training.presets import TrainConfig
from fa2jax.training.state import ModelParts, TrainState
from pallas_kernels.fa2 import ring


def token_layout(batch: dict, context_shards: int = 1) -> dict:
    """A batch as the steps' losses read it: tokens, segment_ids, positions, targets and
    target_mask [..., T] each, in the zig-zag order of `context_shards` devices (token order for 1).

    Targets pair each position with the next token of its segment (`next_token_targets`), found
    before the permutation so that every position keeps its own.
    """
    targets, mask = next_token_targets(batch["tokens"], batch["segment_ids"])
    out = {k: batch[k] for k in ("tokens", "segment_ids", "positions")}
    out.update(targets=targets, target_mask=mask)
    if context_shards == 1:
        return out
    return {k: ring.zigzag(x, context_shards, axis=x.ndim - 1) for k, x in out.items()}


def make_train_step(parts: ModelParts, cfg: TrainConfig, tx: optax.GradientTransformation,
                    teacher: ModelParts | None = None, mesh: Mesh | None = None):
    """Builds `step(state, rest, batch, teacher_params, teacher_rest) -> (state, metrics)`, jitted.

    The `state` passed in is donated (its buffers are reused): use only the returned one.

    `batch` holds [grad_accum * batch_size, T] arrays; they are split into `grad_accum`
    micro-batches scanned in order, gradients summed, and divided by the total target count.
    Teacher arguments are None without a teacher.

    With a `mesh` (see `fa2jax.sharding`), the state must be placed by `sharding.shard(state, mesh)`
    and keeps that placement; each micro-batch is split by rows over the batch axes (and by
    positions, in zig-zag order, over a context axis), and the step runs under the mesh, so the
    attention kernels run per shard (ring attention over a context axis).
    """
    distill = teacher is not None and cfg.distill_weight > 0
    schedule = learning_rate_schedule(cfg)
    shards = 1 if mesh is None else sharding.context_shards(mesh)
    zigzag = shards > 1

    def micro_loss(params, rest, micro, t_params, t_rest):
        logits = parts.logits(params, rest, micro, zigzag=zigzag)  # [B, T, V]
        nll, count = token_cross_entropy_sum(logits, micro["targets"], micro["target_mask"])
        if not distill:
            return nll, (nll, count, jnp.zeros(()))
        t_logits = jax.lax.stop_gradient(teacher.logits(t_params, t_rest, micro, zigzag=zigzag))  # [B, T, V]
        kl = token_distillation_kl_sum(logits, t_logits, micro["target_mask"], cfg.distill_temperature)
        return (1 - cfg.distill_weight) * nll + cfg.distill_weight * kl, (nll, count, kl)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    # The old state is donated: a 1B model's params + AdamW moments are 13 GB not to hold twice.
    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, rest, batch, t_params, t_rest):
        micro = jax.tree.map(lambda x: x.reshape(cfg.grad_accum, cfg.batch_size, *x.shape[1:]), batch)
        # Every micro-batch split by rows over the devices (a no-op without a mesh), then laid out
        # for the loss and, over a context axis, permuted once for all layers and split by positions.
        micro = jax.tree.map(lambda x: sharding.constrain(x, (None, "batch", None)), micro)
        micro = jax.tree.map(lambda x: sharding.constrain(x, (None, "batch", "seq")), token_layout(micro, shards))

        def body(carry, mb):
            g_sum, nll_sum, count_sum, kl_sum = carry
            g, (nll, count, kl) = grad_fn(state.params, rest, mb, t_params, t_rest)
            g_sum = jax.tree.map(jnp.add, g_sum, g)
            return (g_sum, nll_sum + nll, count_sum + count, kl_sum + kl), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        (g_sum, nll_sum, count, kl_sum), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": nll_sum / denom,
            "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
            "lr": schedule(state.step),
            "targets": count,
        }
        if distill:
            metrics["distill_kl"] = kl_sum / denom
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        if mesh is not None:  # the donated buffers are reused only if the placement stays the same
            new_state = jax.lax.with_sharding_constraint(new_state, sharding.tree_shardings(new_state, mesh))
        return new_state, metrics

    return step if mesh is None else _on_mesh(step, mesh, batch_argnum=2)


def _on_mesh(fn, mesh: Mesh, batch_argnum: int):
    """`fn` called under `mesh` with argument `batch_argnum` (a dict of [rows, ...] arrays) split by rows."""

    @functools.wraps(fn)
    def wrapped(*args):
        args = list(args)
        args[batch_argnum] = {k: jax.device_put(x, sharding.batch_sharding(mesh, np.ndim(x)))
                              for k, x in args[batch_argnum].items()}
        with jax.set_mesh(mesh):
            return fn(*args)

    return wrapped


def make_eval_step(parts: ModelParts, mesh: Mesh | None = None):
    """Builds `eval_step(params, rest, batch) -> (nll_sum, count)`, jitted (run on `mesh` if given)."""

    shards = 1 if mesh is None else sharding.context_shards(mesh)

    @jax.jit
    def eval_step(params, rest, batch):
        batch = token_layout(batch, shards)  # as the train step lays it out
        logits = parts.logits(params, rest, batch, zigzag=shards > 1)
        return token_cross_entropy_sum(logits, batch["targets"], batch["target_mask"])

    return eval_step if mesh is None else _on_mesh(eval_step, mesh, batch_argnum=2)


def evaluate(parts: ModelParts, params: Any, rows: PackedRows, batch_size: int, max_batches: int,
             eval_step=None) -> dict:
    """Mean next-token loss and perplexity over the first `max_batches` batches of `rows`."""
    eval_step = eval_step or make_eval_step(parts)
    nll, count = 0.0, 0.0
    for batch in eval_batches(rows, batch_size, max_batches):
        n, c = eval_step(params, parts.rest, batch)
        nll, count = nll + float(n), count + float(c)
    if count == 0:
        raise ValueError(f"no validation targets in {rows.num_rows=} rows")
    loss = nll / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def measure_acceptance(draft: ModelParts, draft_params: Any, target: ModelParts, rows: PackedRows,
                       batch_size: int, max_batches: int) -> dict:
    """Per-token speculative acceptance rates of `draft` against `target` on `rows`."""

    @jax.jit
    def sums(d_params, d_rest, t_params, t_rest, batch):
        return acceptance_sums(draft.logits(d_params, d_rest, batch), target.logits(t_params, t_rest, batch),
                               batch["segment_ids"])

    total = {"sampled": 0.0, "greedy": 0.0, "count": 0.0}
    for batch in eval_batches(rows, batch_size, max_batches):
        out = sums(draft_params, draft.rest, target.params, target.rest, batch)
        total = {k: total[k] + float(out[k]) for k in total}
    count = max(total["count"], 1.0)
    return {"acceptance_sampled": total["sampled"] / count, "acceptance_greedy": total["greedy"] / count}
