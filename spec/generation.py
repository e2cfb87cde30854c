"""Pieces shared by the speculative loop and the incremental baseline: result types, argument
checks, calling a split `nnx` model as a pure function, and writing emitted tokens.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from spec.sampling import sample_probs, warp_probs

# eos ids are padded with -1 (no token) to a multiple of this, so that up to EOS_SLOTS of them, or
# none, share one compiled loop.
EOS_SLOTS = 8


@struct.dataclass
class GenerationStats:
    """Counters of one `generate` call."""

    # Target forward passes, prefill included.  # [] int32
    target_calls: jax.Array
    # accepted_histogram[k]: (row, step) pairs that emitted k tokens; index 0 stays 0.  # [max_depth + 2] int32
    accepted_histogram: jax.Array
    # Tokens emitted per step per active row (accepted path + bonus), averaged.  # [] float32
    mean_accepted_length: jax.Array


@struct.dataclass
class GenerationResult:
    """Output of `SpeculativeDecoder.generate` and `generate_incremental`."""

    # Prompt then generated tokens per row; 0 from lengths[b] on.  # [B, P + max_new_tokens] int32
    tokens: jax.Array
    # Prompt length + generated tokens (EOS included when it ended the row).  # [B] int32
    lengths: jax.Array
    stats: GenerationStats


@dataclasses.dataclass(frozen=True)
class SamplingArgs:
    """Checked, host-side arguments of a generate call."""

    prompt: jax.Array  # [B, P] int32
    prompt_lengths: jax.Array  # [B] int32
    max_new_tokens: int
    temperature: float
    top_p: float
    rng: jax.Array
    eos_id: int  # the first eos id, -1 when there is none
    top_k: int = 0
    min_p: float = 0.0
    eos_ids: tuple[int, ...] = (-1,) * EOS_SLOTS  # every token that ends a row, then -1 padding

    def warp(self) -> dict:
        """The warp settings as traced scalars, keyword arguments of the jitted loops."""
        return dict(temperature=jnp.float32(self.temperature), top_p=jnp.float32(self.top_p),
                    top_k=jnp.int32(self.top_k), min_p=jnp.float32(self.min_p))


def _eos_tuple(eos_id, vocab_size: int) -> tuple[int, ...]:
    """eos_id (None, an int or a sequence of ints) as a tuple of ids padded with -1 to a multiple of
    EOS_SLOTS."""
    ids = () if eos_id is None else (eos_id,) if isinstance(eos_id, (int, np.integer)) else eos_id
    try:
        ids = tuple(ids)
    except TypeError:
        raise TypeError(f"eos_id must be None, an int or a sequence of ints: {eos_id=}") from None
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"eos_id must be None, an int or a sequence of ints: {eos_id=}")
        if not 0 <= i < vocab_size:
            raise ValueError(f"eos_id must be a token id: {eos_id=} {vocab_size=}")
    ids = tuple(int(i) for i in ids)
    return ids + (-1,) * (-len(ids) % EOS_SLOTS if ids else EOS_SLOTS)


def check_generate_args(prompt, prompt_lengths, *, vocab_size: int, max_new_tokens: int, temperature: float,
                        top_p: float, rng, eos_id, top_k: int = 0, min_p: float = 0.0) -> SamplingArgs:
    """Validates the arguments shared by every generate entry point (on the host, before tracing).

    Args:
      prompt: right-padded prompts.  # [B, P] int
      prompt_lengths: tokens of each prompt, 1 .. P.  # [B] int
      vocab_size: V of the models.
      max_new_tokens: tokens to generate per row, >= 1.
      temperature: 0 for greedy, else > 0.
      top_p: nucleus mass in (0, 1].
      rng: PRNG key (or an int seed), required when temperature > 0.
      eos_id: token that ends a row, a sequence of them (any one ends it), or None.
      top_k: 0, or keep the k most likely tokens.
      min_p: in [0, 1): keep tokens at least min_p x as likely as the most likely one.

    Returns:
      SamplingArgs with arrays converted.

    Raises:
      TypeError: an argument is traced (generate was called inside `jax.jit`).
      ValueError: an argument is out of range.
    """
    for name, value in (("prompt", prompt), ("prompt_lengths", prompt_lengths), ("max_new_tokens", max_new_tokens),
                        ("temperature", temperature), ("top_p", top_p), ("rng", rng), ("eos_id", eos_id),
                        ("top_k", top_k), ("min_p", min_p)):
        if isinstance(value, jax.core.Tracer):
            raise TypeError(
                f"generate was called inside jax.jit ({name} is traced): it compiles its own loop and checks "
                f"its arguments on the host, so call it outside jax.jit, with concrete arrays")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be an integer [B, P] array: {prompt.shape=} {prompt.dtype=}")
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != prompt.shape[:1]:
        raise ValueError(f"prompt_lengths must be [B]: {lengths.shape=} {prompt.shape=}")
    if lengths.min() < 1 or lengths.max() > prompt.shape[1]:
        raise ValueError(f"prompt lengths must lie in [1, P={prompt.shape[1]}]: {prompt_lengths=}")
    tokens = np.asarray(prompt)
    in_prompt = np.arange(prompt.shape[1])[None, :] < lengths[:, None]
    if tokens[in_prompt].min() < 0 or tokens[in_prompt].max() >= vocab_size:
        raise ValueError(f"prompt tokens must lie in [0, {vocab_size=})")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int: {max_new_tokens=}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0: {temperature=}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1]: {top_p=}")
    if temperature > 0 and rng is None:
        raise ValueError(f"sampling needs a PRNG key: {temperature=} {rng=}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 keeps every token): {top_k=}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must lie in [0, 1): {min_p=}")
    eos_ids = _eos_tuple(eos_id, vocab_size)
    if rng is None:
        rng = jax.random.key(0)  # unused: greedy decoding draws nothing
    elif isinstance(rng, (int, np.integer)):
        rng = jax.random.key(rng)
    return SamplingArgs(
        prompt=jnp.where(jnp.asarray(in_prompt), prompt, 0).astype(jnp.int32),
        prompt_lengths=jnp.asarray(lengths, jnp.int32), max_new_tokens=int(max_new_tokens),
        temperature=float(temperature), top_p=float(top_p), rng=rng, eos_id=eos_ids[0],
        top_k=int(top_k), min_p=float(min_p), eos_ids=eos_ids)


def cache_len(config, committed: int, call_rows: int) -> int:
    """Cache slots for `committed` tokens plus the rows one call writes past them: `call_rows`, or
    the config's `invariant_rows` when more (a batch-invariant model writes that many every call).
    The incremental baseline and the speculative loop size a target's cache alike, so that with
    invariant rows both run the same shapes. `config.max_len` does not bound it: RoPE has no learned
    length, so a cache may be longer than the rows a model was trained on."""
    return committed + max(call_rows, config.invariant_rows)


def call_model(graphdef: nnx.GraphDef, params: nnx.State, method: str, *args):
    """Calls `method` of a split nnx model as a pure function (inside jit, params are traced)."""
    model = nnx.merge(graphdef, params)
    return getattr(model, method)(*args)


def emit_tokens(buffer: jax.Array, lengths: jax.Array, limit: jax.Array, done: jax.Array,
                new: jax.Array, num_new: jax.Array, eos_id) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Appends up to num_new[b] tokens per row, stopping after EOS or at the row's limit.

    Args:
      buffer: output tokens.  # [B, P + M] int32
      lengths: filled tokens per row.  # [B] int32
      limit: prompt length + max_new_tokens per row.  # [B] int32
      done: rows that already stopped; they take nothing.  # [B] bool
      new: candidate tokens, in order.  # [B, E] int32
      num_new: how many of them are real.  # [B] int32
      eos_id: the token ids that end a row, a scalar or [n_eos]; -1 for none.

    Returns:
      (buffer, lengths, done) updated.
    """
    idx = jnp.arange(new.shape[1], dtype=jnp.int32)[None, :]  # [1, E]
    eos_ids = jnp.reshape(jnp.asarray(eos_id, jnp.int32), (-1,))  # [n_eos]
    is_eos = (new[..., None] == eos_ids).any(-1) & (idx < num_new[:, None])  # [B, E]
    has_eos = is_eos.any(-1)
    first_eos = jnp.argmax(is_eos, axis=-1).astype(jnp.int32)
    count = jnp.where(has_eos, first_eos + 1, num_new)
    count = jnp.minimum(count, limit - lengths)
    count = jnp.where(done, 0, count)
    # Tokens past the count go to an out-of-range slot, which the scatter drops.
    slots = jnp.where(idx < count[:, None], lengths[:, None] + idx, buffer.shape[1])
    rows = jnp.broadcast_to(jnp.arange(buffer.shape[0])[:, None], slots.shape)
    buffer = buffer.at[rows, slots].set(new, mode="drop")
    stopped_at_eos = has_eos & (first_eos < count)
    lengths = lengths + count
    return buffer, lengths, done | stopped_at_eos | (lengths >= limit)


def first_token(prefill_logits: jax.Array, prompt_lengths: jax.Array, key: jax.Array, temperature,
                top_p, top_k=0, min_p=0.0) -> jax.Array:
    """The first generated token, from the target's logits at each prompt's last position.

    Args:
      prefill_logits: logits of the prefill.  # [B, P, V]
      prompt_lengths: prompt lengths.  # [B] int32
      key: PRNG key.
      temperature, top_p, top_k, min_p: sampling warp (temperature 0 is argmax).

    Returns:
      tokens.  # [B] int32
    """
    last = jnp.take_along_axis(prefill_logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    return sample_probs(key, warp_probs(last, temperature, top_p, top_k, min_p))
