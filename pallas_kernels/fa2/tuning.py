"""The autotuner of `flash_attention`: times candidate configs on the device, caches the fastest.

It sits above the API: it calls `flash_attention` (passed in, the public one by default) with each
candidate -- portable `BlockSizes` (`autotune`), or Hopper `MosaicFwdConfig` / `MosaicBwdConfig`
(`autotune_mosaic`, or `autotune(..., backend="mosaic")`) -- and writes the winner through
`block_sizes.save_tuned`, where the API's lookup finds it on the next call. The API itself reads only
`block_sizes`, so nothing imports back.

A Mosaic candidate is run once and its outputs (and gradients) compared with the default config's
before it is timed: a new tile shape or schedule can be wrong, not only slow, and a wrong one is
rejected with a log line, as is one that does not compile.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import math
import pathlib
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.common.device import device_kind as current_device_kind
from pallas_kernels.common.timing import median_time
from pallas_kernels.fa2 import mosaic_bwd
from pallas_kernels.fa2.api import flash_attention
from pallas_kernels.fa2.block_sizes import (
    BLOCK_SIZES,
    MEASURED,
    MOSAIC_FWD,
    BlockSizes,
    cache_key,
    candidate_block_sizes,
    default_mosaic_bwd_config,
    feature_names,
    mosaic_bwd_section,
    save_tuned,
)
from pallas_kernels.fa2.mosaic_bwd import MosaicBwdConfig
from pallas_kernels.fa2.mosaic_fwd import MosaicFwdConfig

logger = logging.getLogger(__name__)

# A candidate beats the default only by more than this fraction of its time: a smaller gain is
# within the run-to-run spread of median_time, and shipping a variant for noise makes it the default.
MIN_GAIN = 0.01
# The floor of the output check: 2^-7 is two bf16 rounding steps at 1 (mosaic_sweep's rule).
ERROR_FLOOR = 2.0 ** -7


def autotune(q, k, v, *, candidates: list[BlockSizes] | None = None, repeats: int = 10,
             include_backward: bool = True, save: bool = True, attention: Callable = flash_attention,
             backend=None, **attention_kwargs):
    """Times candidate configs on the current device and caches the fastest.

    Args:
      q, k, v: representative inputs ([B, T, H, D], [B, S, K, D]).
      candidates: block sizes to try (default `candidate_block_sizes(D)`); portable only.
      repeats: timed runs per candidate (median taken).
      include_backward: time forward + backward (training) instead of forward alone.
      save: write the winner into the user cache (`$FA2JAX_TUNING_CACHE` or ~/.cache/fa2jax/).
      attention: the function timed, called as attention(q, k, v, block_sizes=..., **attention_kwargs).
      backend: "mosaic" tunes the Hopper kernels' configs (`autotune_mosaic`, which returns their
        pair); anything else is passed to `attention` as its backend while the portable block
        sizes are tuned (on Hopper, backend="portable" makes the timed kernels the portable ones).
      **attention_kwargs: the feature arguments of `flash_attention` (causal, window_size, ...).

    Returns:
      The fastest BlockSizes; candidates that fail to compile are skipped with a log line.
    """
    if backend == "mosaic":
        if candidates is not None:
            raise ValueError(f"candidates are portable BlockSizes; pass Mosaic candidates to autotune_mosaic, "
                             f"got {candidates=}")
        return autotune_mosaic([(q, k, v)], repeats=repeats, include_backward=include_backward, save=save,
                               attention=attention, **attention_kwargs)
    if backend is not None:
        attention_kwargs["backend"] = backend
    device_kind = current_device_kind()
    candidates = candidates or candidate_block_sizes(q.shape[-1])
    best, best_time = None, float("inf")
    for blocks in candidates:
        def run(blocks=blocks):
            if include_backward:
                return jax.grad(lambda q, k, v: attention(
                    q, k, v, block_sizes=blocks, **attention_kwargs).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2))(q, k, v)
            return attention(q, k, v, block_sizes=blocks, **attention_kwargs)
        fn = jax.jit(run)
        try:
            seconds = median_time(fn, repeats)
        except Exception as error:  # a candidate that does not compile (e.g. out of shared memory)
            logger.info("autotune: %s failed: %s", blocks, error)
            continue
        logger.info("autotune: %s took %.1f us", blocks, seconds * 1e6)
        if seconds < best_time:
            best, best_time = blocks, seconds
    if best is None:
        raise ValueError(f"no candidate block size ran on {device_kind=}")
    if save:
        key = cache_key(device_kind, q.dtype, q.shape[-1], feature_names(**attention_kwargs))
        save_tuned(key, {BLOCK_SIZES: best})
    return best


# -- the Hopper kernels --------------------------------------------------------------------------

# Shared memory one CTA may use on H100/H200 (sm90), as the backward's estimate takes it.
SMEM_LIMIT_BYTES = mosaic_bwd.SMEM_LIMIT_BYTES
_REDUCTION_SCRATCH_BYTES = 2048  # what Mosaic GPU sets aside per CTA unless told otherwise (Pipeline)


def fwd_smem_bytes(config: MosaicFwdConfig, *, head_dim: int, itemsize: int, segments: bool = False) -> int:
    """A lower bound on the Hopper forward's shared memory: the buffers `mosaic_pipeline.Pipeline.run`
    allocates (without barriers and alignment). Above SMEM_LIMIT_BYTES the kernel cannot launch.

    Q (then O) per consumer, the K and V rings, the lse rows, the K tiles' ids with segment ids, and
    a persistent kernel's own O slot per consumer."""
    rows, D = config.block_q, head_dim
    total = config.consumers * rows * D * itemsize  # Q, then O
    total += 2 * config.num_stages * config.block_kv * D * itemsize  # K and V rings
    total += config.consumers * rows * 4  # lse
    if segments:
        total += config.num_stages * config.block_kv * 4
    if config.persistent:
        total += config.consumers * rows * D * itemsize  # O's own slot
    return total + _REDUCTION_SCRATCH_BYTES


def mosaic_fwd_candidates(head_dim: int, dtype=jnp.bfloat16, segments: bool = False) -> list[MosaicFwdConfig]:
    """The forward configs autotune_mosaic tries, the default first: four tile shapes
    (block_q, block_kv, num_stages), each plain, persistent, with early K waits, and both; at D=64
    also three consumer warpgroups (192-row CTAs, FA3's hdim-64 layout) with 128 or 192 keys; those
    that cannot fit in shared memory left out."""
    default = MosaicFwdConfig.for_head_dim(head_dim)
    candidates = [default]
    for block_q, block_kv, stages in ((64, 128, 2), (64, 128, 3), (128, 64, 2), (64, 64, 2)):
        for persistent in (False, True):
            for early_k_wait in (False, True):
                candidates.append(dataclasses.replace(
                    default, block_q=block_q, block_kv=block_kv, num_stages=stages, persistent=persistent,
                    early_k_wait=early_k_wait, consumers=2))
    if head_dim == 64:
        for block_kv, stages, persistent, early_k_wait in ((128, 2, False, False), (128, 3, False, False),
                                                           (192, 2, False, False), (128, 2, True, False),
                                                           (128, 2, True, True)):
            candidates.append(dataclasses.replace(default, consumers=3, block_kv=block_kv, num_stages=stages,
                                                  persistent=persistent, early_k_wait=early_k_wait))
    itemsize = jnp.dtype(dtype).itemsize
    return [c for c in dict.fromkeys(candidates)
            if fwd_smem_bytes(c, head_dim=head_dim, itemsize=itemsize, segments=segments) <= SMEM_LIMIT_BYTES]


def mosaic_bwd_candidates(head_dim: int, dtype=jnp.bfloat16, deterministic: bool = True,
                          segments: bool = False) -> list[MosaicBwdConfig]:
    """The backward configs autotune_mosaic tries for one dQ mode, the default first: ring depth
    2 or 3, and (deterministic) the dQ kernel's consumer rows 64 or 128, or (reduce-add) its dQ
    path's buffering, chunking and split; those that cannot fit in shared memory
    (`mosaic_bwd.dkdv_smem_bytes`) left out."""
    default = default_mosaic_bwd_config(head_dim, deterministic)
    candidates = [default]
    for stages in (2, 3):
        if default.split_head_dim:  # 64-row tiles only: the ring depth is the one choice
            candidates.append(dataclasses.replace(default, num_stages=stages))
            continue
        if deterministic:
            candidates += [dataclasses.replace(default, num_stages=stages, block_q_dq=rows) for rows in (64, 128)]
            continue
        variants = [dict(), dict(dq_buffers=2), dict(dq_buffers=2, dq_chunks=2)]
        if head_dim % 128 == 0:
            variants.append(dict(dq_split=True))
        candidates += [dataclasses.replace(default, num_stages=stages, **variant) for variant in variants]
    itemsize = jnp.dtype(dtype).itemsize
    return [c for c in dict.fromkeys(candidates)
            if mosaic_bwd.dkdv_smem_bytes(c, head_dim=head_dim, itemsize=itemsize, segments=segments)
            <= SMEM_LIMIT_BYTES]


@dataclasses.dataclass(frozen=True)
class MosaicTrial:
    """One candidate on one input: its median seconds when it ran right, else why not."""

    config: MosaicFwdConfig | MosaicBwdConfig
    status: str  # "ok", "failed" (did not compile or run), "wrong" (off the default), "skipped" (deadline)
    seconds: float | None = None
    error: float | None = None  # max abs difference from the default config's outputs
    message: str = ""


def max_error(outputs, reference) -> tuple[float, float]:
    """(max abs difference, tolerance) of the array furthest off, by difference / tolerance.

    An array may be off its reference by two rounding steps of its dtype at the reference's largest
    magnitude (a kernel that accumulates in another order rounds each element differently, by up to
    one step each time it rounds), plus ERROR_FLOOR; a wrong tile misses or doubles whole products,
    far more. NaN counts as infinitely off.
    """
    worst = (0.0, 1.0)
    for out, ref in zip(jax.tree.leaves(outputs), jax.tree.leaves(reference), strict=True):
        if out.shape != ref.shape:
            return math.inf, 1.0
        step = float(jnp.finfo(ref.dtype).eps) if jnp.issubdtype(ref.dtype, jnp.floating) else 0.0
        # Reduced on the device: only two numbers per array come to the host.
        out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
        error = float(jnp.max(jnp.abs(out - ref), initial=0.0))
        error = math.inf if math.isnan(error) else error
        tolerance = 2 * step * float(jnp.max(jnp.abs(ref), initial=0.0)) + ERROR_FLOOR
        if error / tolerance > worst[0] / worst[1]:
            worst = (error, tolerance)
    return worst


def trial_run(attention: Callable, q, k, v, configs, *, include_backward: bool, attention_kwargs: dict):
    """fn() -> outputs of one candidate pair (MosaicFwdConfig | None, MosaicBwdConfig | None), jitted
    with the arrays as arguments (not baked in as constants): out, and with the backward also
    (dq, dk, dv) for a fixed random cotangent (a sum's all-ones cotangent hides errors that cancel
    across rows)."""
    kwargs = dict(attention_kwargs, mosaic_configs=tuple(configs))
    if configs[1] is not None:
        kwargs["deterministic"] = configs[1].deterministic
    if not include_backward:
        return functools.partial(jax.jit(lambda q, k, v: attention(q, k, v, **kwargs)), q, k, v)

    def run(q, k, v, dout):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, **kwargs), q, k, v)
        return (out, *vjp(dout))
    dout = jax.random.normal(jax.random.key(0), q.shape, jnp.float32).astype(q.dtype)
    return functools.partial(jax.jit(run), q, k, v, dout)


def time_mosaic_candidates(inputs: Sequence[tuple], candidates: Sequence, configs_of: Callable, *,
                           include_backward: bool, timer: Callable, attention: Callable,
                           attention_kwargs: dict, deadline: float | None = None) -> list[list[MosaicTrial]]:
    """trials[c][i]: candidate c on input i. candidates[0] is the default, whose outputs are the
    reference the others must match (before they are timed).

    configs_of(candidate) -> the (forward, backward) config pair to run. A candidate that would not
    end before `deadline` (time.monotonic() seconds) at the pace of the slowest one so far is not
    started: "skipped" on every input.

    Raises:
      ValueError: the default does not run on some input (nothing can be judged without it).
    """
    references = [None] * len(inputs)
    trials = []
    slowest = 0.0  # seconds of the slowest candidate so far (compiles, check, timing on every input)
    for index, candidate in enumerate(candidates):
        started = time.monotonic()
        if deadline is not None and started + slowest > deadline:
            logger.info("autotune_mosaic: skipped (it would end past the deadline) %s", candidate)
            trials.append([MosaicTrial(candidate, "skipped", message="deadline")] * len(inputs))
            continue
        row = []
        for i, (q, k, v) in enumerate(inputs):
            row.append(_trial(candidate, configs_of(candidate), (q, k, v), references, i,
                              include_backward=include_backward, timer=timer, attention=attention,
                              attention_kwargs=attention_kwargs))
            if index == 0 and row[-1].status != "ok":
                raise ValueError(f"the default config did not run on input {i} ({_shape_label(q, k)}), so no "
                                 f"candidate can be judged: {row[-1].message}")
            if row[-1].status != "ok":
                break  # out on one input is out: the others need not compile it
        row += [MosaicTrial(candidate, "skipped", message="out on an earlier input")] * (len(inputs) - len(row))
        trials.append(row)
        slowest = max(slowest, time.monotonic() - started)
    return trials


def _trial(candidate, configs, qkv, references: list, i: int, *, include_backward: bool, timer: Callable,
           attention: Callable, attention_kwargs: dict) -> MosaicTrial:
    label = _shape_label(*qkv[:2])
    try:
        fn = trial_run(attention, *qkv, configs, include_backward=include_backward,
                       attention_kwargs=attention_kwargs)
        outputs = jax.block_until_ready(fn())
    except Exception as error:  # does not compile (shared memory, registers) or does not run
        logger.info("autotune_mosaic: %s failed on %s: %s", candidate, label, _short(error))
        return MosaicTrial(candidate, "failed", message=_short(error))
    if references[i] is None:
        references[i], error = outputs, 0.0
    else:
        error, tolerance = max_error(outputs, references[i])
        if not error <= tolerance:
            logger.info("autotune_mosaic: %s rejected on %s: max abs error %.3g from the default's outputs "
                        "(tolerance %.3g)", candidate, label, error, tolerance)
            return MosaicTrial(candidate, "wrong", error=error,
                               message=f"max abs error {error:.3g} > tolerance {tolerance:.3g}")
    try:
        seconds = timer(fn)
    except Exception as failure:
        logger.info("autotune_mosaic: %s failed while timed on %s: %s", candidate, label, _short(failure))
        return MosaicTrial(candidate, "failed", error=error, message=_short(failure))
    logger.info("autotune_mosaic: %s took %.1f us on %s", candidate, seconds * 1e6, label)
    return MosaicTrial(candidate, "ok", seconds=seconds, error=error)


def select_mosaic(trials: list[list[MosaicTrial]], min_gain: float = MIN_GAIN) -> int:
    """The index of the winner among trials[c][i] (candidate c, input i; c = 0 the default): the
    candidate that ran right on every input with the lowest geometric mean of its time over the
    default's, if that mean is below 1 - min_gain; else the default (0)."""
    best, best_score = 0, 1.0 - min_gain
    for index, row in enumerate(trials[1:], start=1):
        if any(t.status != "ok" for t in row):
            continue
        score = math.exp(sum(math.log(t.seconds / d.seconds) for t, d in zip(row, trials[0], strict=True)) / len(row))
        if score < best_score:
            best, best_score = index, score
    return best


def autotune_mosaic(inputs: Sequence[tuple], *, include_backward: bool = True, deterministic: bool = True,
                    fwd_candidates: Sequence[MosaicFwdConfig] | None = None,
                    bwd_candidates: Sequence[MosaicBwdConfig] | None = None, repeats: int = 10,
                    save: bool = True, path: pathlib.Path | None = None, timer: Callable | None = None,
                    attention: Callable = flash_attention, deadline: float | None = None,
                    **attention_kwargs) -> tuple[MosaicFwdConfig, MosaicBwdConfig | None]:
    """Times the Hopper kernels' candidate configs on the current device and caches the fastest.

    First the forward alone over `fwd_candidates`; then, with that forward, forward + backward over
    `bwd_candidates` of the dQ mode `deterministic` names. Each candidate runs once on each input and
    must match the default config's outputs (`max_error`) before it is timed; one that fails to
    compile or run, or is off, is left out with a log line. The winner is the fastest over all
    inputs (`select_mosaic`), so inputs of one cache key (same dtype, head dim and features, other
    shapes) tune one entry.

    Args:
      inputs: (q [B, T, H, D], k [B, S, K, D], v) triples, one dtype and head dim.
      include_backward: also tune the backward.
      deterministic: the backward's dQ mode (False: the reduce-add configs, cached apart).
      fwd_candidates, bwd_candidates: default `mosaic_fwd_candidates` / `mosaic_bwd_candidates`,
        whose first entry is the default config; the first entry here is the reference.
      repeats: timed runs per candidate (median taken), for the default timer.
      save: write the winners (and what was measured) under the inputs' cache key, into `path` or
        the user cache (`$FA2JAX_TUNING_CACHE` or ~/.cache/fa2jax/).
      timer: timer(fn) -> seconds of one call of fn() (default `median_time`: `repeats` samples of
        five calls each).
      attention: the function run, as attention(q, k, v, mosaic_configs=(fwd, bwd), **attention_kwargs).
      deadline: time.monotonic() seconds after which no further candidate starts. Past it before the
        default backward ran, the backward is not tuned (None, not saved); before the default
        forward ran, ValueError.
      **attention_kwargs: the feature arguments of `flash_attention` (causal, window_size, ...).

    Returns:
      (forward config, backward config or None without the backward).
    """
    inputs = [tuple(qkv) for qkv in inputs]
    if not inputs or any(len(qkv) != 3 for qkv in inputs):
        raise ValueError(f"inputs must be a non-empty list of (q, k, v) triples, got {len(inputs)=}")
    q0 = inputs[0][0]
    if any(q.dtype != q0.dtype or q.shape[-1] != q0.shape[-1] for q, _, _ in inputs):
        raise ValueError(f"inputs must share one dtype and head dim (one cache key), got "
                         f"{[(str(q.dtype), q.shape[-1]) for q, _, _ in inputs]}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic=}")
    if not deterministic and not mosaic_bwd.atomic_dq_available():
        raise ValueError(f"deterministic=False tunes the reduce-add dQ kernel, which "
                         f"{mosaic_bwd.ATOMIC_DQ_ENV}=0 turns off")
    dtype, head_dim = q0.dtype, q0.shape[-1]
    segments = attention_kwargs.get("segment_ids") is not None
    fwd_candidates = list(fwd_candidates or mosaic_fwd_candidates(head_dim, dtype, segments))
    bwd_candidates = list(bwd_candidates or mosaic_bwd_candidates(head_dim, dtype, deterministic, segments))
    if timer is None:
        # Five back-to-back calls per sample hide the host's dispatch behind millisecond kernels.
        timer = functools.partial(median_time, iters=repeats, warmup=2, calls_per_sample=5)
    common = dict(timer=timer, attention=attention, attention_kwargs=attention_kwargs, deadline=deadline)
    labels = [_shape_label(q, k) for q, k, _ in inputs]
    sections, measured = {}, {}

    fwd_trials = time_mosaic_candidates(inputs, fwd_candidates, lambda c: (c, None), include_backward=False,
                                        **common)
    if fwd_trials[0][0].status != "ok":
        raise ValueError(f"the deadline passed before the default forward config ran on {labels}")
    fwd = fwd_candidates[select_mosaic(fwd_trials)]
    sections[MOSAIC_FWD], measured[MOSAIC_FWD] = fwd, _notes(fwd_trials, fwd, labels)
    bwd = None
    if include_backward:
        bwd_trials = time_mosaic_candidates(inputs, bwd_candidates, lambda c: (fwd, c), include_backward=True,
                                            **common)
        if bwd_trials[0][0].status == "ok":
            bwd = bwd_candidates[select_mosaic(bwd_trials)]
            section = mosaic_bwd_section(bwd.deterministic)
            sections[section], measured[section] = bwd, _notes(bwd_trials, bwd, labels)
    if save:
        key = cache_key(current_device_kind(), dtype, head_dim, feature_names(**attention_kwargs))
        save_tuned(key, {**sections, MEASURED: measured}, path)
    return fwd, bwd


def _notes(trials: list[list[MosaicTrial]], winner, labels: list[str]) -> dict:
    """What the MEASURED section records of one stage: where, on what, and how the winner did."""
    row = next(r for r in trials if r[0].config == winner)
    by_status = {}
    for r in trials:
        status = next((t.status for t in r if t.status != "ok"), "ok")
        by_status[status] = by_status.get(status, 0) + 1
    return {
        "device_kind": current_device_kind(),
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "inputs": labels,
        "us": [round(t.seconds * 1e6, 1) for t in row],
        "default_us": [round(t.seconds * 1e6, 1) for t in trials[0]],
        "candidates": by_status,
        "rejected": [f"{r[0].config}: {t.message}" for r in trials for t in r if t.status == "wrong"],
    }


def _shape_label(q, k) -> str:
    """'2x8192x16x128' for q [B, T, H, D], with 'S=..,K=..' when k's differ."""
    B, T, H, D = q.shape
    extra = "" if k.shape[1:3] == (T, H) else f" S={k.shape[1]} K={k.shape[2]}"
    return f"{B}x{T}x{H}x{D}{extra}"


def _short(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 300 else text[:300] + "..."

