"""`generate_incremental`: the target decoding alone, one token per forward pass.

The baseline that speculative decoding must reproduce (greedy) or match in distribution
(sampling): same warping (`spec.sampling`), same result type, same stopping rules, and like the
speculative loop a single jit-compiled `lax.while_loop` (run in chunks, with the host in between,
for streaming and stop strings: `spec.streaming`). By default the compiled program fuses the
target's projections first (`fa2jax.fuse_projections`: fewer kernels per token, for one
concatenation of the weights per compiled call), as `SpeculativeDecoder` does.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from fa2jax import KVCache, Transformer, fuse_projections
from spec.generation import (
    GenerationResult, GenerationStats, cache_len, call_model, check_generate_args, emit_tokens, first_token)
from spec.sampling import sample_probs, warp_probs
from spec.streaming import DEFAULT_CHUNK_STEPS, check_stream_args, run_chunked


@struct.dataclass
class IncrementalState:
    """Loop state of one-token-at-a-time decoding."""

    # Prompt followed by the emitted tokens; 0 past lengths.  # [B, P + M] int32
    tokens: jax.Array
    # Filled tokens of each row in `tokens`.  # [B] int32
    lengths: jax.Array
    # prompt length + max_new_tokens: where a row must stop.  # [B] int32
    limit: jax.Array
    # Last emitted token, not yet in the cache.  # [B] int32
    last: jax.Array
    # Rows that hit EOS or their limit.  # [B] bool
    done: jax.Array
    # Committed context: prompt + emitted tokens except `last`.
    cache: KVCache
    # PRNG key, split once per step.
    rng: jax.Array
    # Target passes so far, prefill included.  # [] int32
    target_calls: jax.Array


def _fused(graphdef, params, fused: bool):
    """(graphdef, params) of the model the loop runs: the target's, with its projections fused
    when `fused` (inside the trace: XLA concatenates the weights once, before the loop)."""
    if not fused:
        return graphdef, params
    return nnx.split(fuse_projections(nnx.merge(graphdef, params)))


def _init(graphdef, params, prompt, prompt_lengths, rng, eos_id, warp, *, max_new_tokens,
          fused: bool) -> IncrementalState:
    """Prefill and the first token: the state before the loop."""
    batch, prompt_len = prompt.shape
    model = nnx.merge(*_fused(graphdef, params, fused))
    cache = model.init_cache(batch, cache_len(model.config, prompt_len + max_new_tokens, 0))
    logits, cache = model.prefill(prompt, prompt_lengths, cache)
    rng, key = jax.random.split(rng)
    last = first_token(logits, prompt_lengths, key, **warp)
    buffer = jnp.zeros((batch, prompt_len + max_new_tokens), jnp.int32).at[:, :prompt_len].set(prompt)
    limit = prompt_lengths + max_new_tokens
    ones = jnp.ones((batch,), jnp.int32)
    buffer, lengths, done = emit_tokens(buffer, prompt_lengths, limit, jnp.zeros((batch,), bool), last[:, None],
                                        ones, eos_id)
    return IncrementalState(tokens=buffer, lengths=lengths, limit=limit, last=last, done=done, cache=cache,
                            rng=rng, target_calls=jnp.array(1, jnp.int32))


def _next_token(logits, key, warp, sampling: bool) -> jax.Array:
    """The token after `logits` [B, V]: [B] int32. `sampling` is static: greedy decoding
    (temperature 0) compiles the argmax alone, since warping and drawing would pick the same token
    (the warp is a one-hot at temperature 0) at many more kernels per step, and choosing at run
    time would take a `lax.cond`, a host round trip per step on a GPU."""
    if not sampling:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_probs(key, warp_probs(logits, **warp))


def _run(graphdef, params, state: IncrementalState, eos_id, warp, step_limit, *, fused: bool,
         sampling: bool = True) -> IncrementalState:
    """Decodes while some row is active and fewer than `step_limit` target passes ran."""
    graphdef, params = _fused(graphdef, params, fused)
    ones = jnp.ones(state.lengths.shape, jnp.int32)

    def step(s: IncrementalState) -> IncrementalState:
        rng, key = jax.random.split(s.rng)
        logits, cache = call_model(graphdef, params, "decode", s.last[:, None], s.cache)
        # Stopped rows do not advance their cache.
        cache = cache.replace(lengths=jnp.where(s.done, s.cache.lengths, cache.lengths))
        nxt = _next_token(logits[:, 0], key, warp, sampling)
        buffer, lengths, done = emit_tokens(s.tokens, s.lengths, s.limit, s.done, nxt[:, None], ones, eos_id)
        return s.replace(tokens=buffer, lengths=lengths, done=done, last=jnp.where(s.done, s.last, nxt),
                         cache=cache, rng=rng, target_calls=s.target_calls + 1)

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.target_calls < step_limit), step, state)


def _result(state: IncrementalState, prompt_lengths) -> GenerationResult:
    batch = state.lengths.shape[0]
    steps = state.target_calls - 1
    hist = jnp.zeros((2,), jnp.int32).at[1].set(state.lengths.sum() - prompt_lengths.sum() - batch)
    return GenerationResult(
        tokens=state.tokens, lengths=state.lengths,
        stats=GenerationStats(target_calls=state.target_calls, accepted_histogram=hist,
                              mean_accepted_length=jnp.where(steps > 0, 1.0, 0.0).astype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "fused", "sampling"))
def _generate(graphdef, params, prompt, prompt_lengths, rng, eos_id, warp, *, max_new_tokens, fused, sampling=True):
    graphdef, params = _fused(graphdef, params, fused)
    state = _init(graphdef, params, prompt, prompt_lengths, rng, eos_id, warp, max_new_tokens=max_new_tokens,
                  fused=False)
    state = _run(graphdef, params, state, eos_id, warp, jnp.iinfo(jnp.int32).max, fused=False, sampling=sampling)
    return _result(state, prompt_lengths)


# The chunked path (streaming, stop strings): one compile of each, reused by every chunk.
_init_jit = jax.jit(_init, static_argnames=("graphdef", "max_new_tokens", "fused"))
_run_jit = jax.jit(_run, static_argnames=("graphdef", "fused", "sampling"))
_result_jit = jax.jit(_result)


def generate_incremental(target: Transformer, prompt, prompt_lengths, *, max_new_tokens: int,
                         temperature: float = 0.0, top_p: float = 1.0, rng=None,
                         eos_id: int | Sequence[int] | None = None, top_k: int = 0, min_p: float = 0.0,
                         stream: Callable[[list[np.ndarray]], Any] | None = None,
                         stop_strings: Sequence[str] | None = None, tokenizer=None, decode=None,
                         chunk_steps: int = DEFAULT_CHUNK_STEPS, fused: bool = True) -> GenerationResult:
    """Decodes with the target alone, one token per forward pass.

    Args:
      target: the model.
      prompt: right-padded prompts.  # [B, P] int
      prompt_lengths: prompt length per row, 1 .. P.  # [B] int
      max_new_tokens: tokens per row at most.
      temperature: 0 for greedy (argmax), else sampling with `rng`.
      top_p: nucleus sampling mass in (0, 1].
      rng: PRNG key or int seed.
      eos_id: a row stops after emitting this token, or any token of a sequence of them.
      top_k: > 0 samples among the k most likely tokens only.
      min_p: > 0 drops tokens less likely than min_p x the most likely one.
      stream: called between chunks with one int32 array per row of the tokens accepted since
        the last call (see `spec.streaming`).
      stop_strings: a row ends with the token that completes one of these; needs `tokenizer`
        (with a `decode` method) or `decode` (ids -> str).
      tokenizer, decode: how stop strings see the text.
      chunk_steps: steps of the compiled loop between host calls, with `stream` or `stop_strings`.
      fused: run the target with fused projections (`fa2jax.fuse_projections`; a no-op for a model
        already fused); False runs the target's own layout.

    Returns:
      GenerationResult: tokens [B, P + max_new_tokens], lengths [B], stats (one token per step).

    The cache holds P + max_new_tokens slots, whatever target.config.max_len is. Call it outside
    `jax.jit` (it compiles its own loop; a traced argument raises TypeError).
    """
    args = check_generate_args(
        prompt, prompt_lengths, vocab_size=target.config.vocab_size, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, rng=rng, eos_id=eos_id, top_k=top_k, min_p=min_p)
    streaming = check_stream_args(stream=stream, stop_strings=stop_strings, tokenizer=tokenizer, decode=decode,
                                  chunk_steps=chunk_steps)
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {fused=}")
    graphdef, params = nnx.split(target)
    eos, warp = jnp.asarray(args.eos_ids, jnp.int32), args.warp()
    # Greedy and sampled decoding compile apart (see `_next_token`); other settings stay traced.
    sampling = args.temperature > 0
    if not streaming.chunked:
        return _generate(graphdef, params, args.prompt, args.prompt_lengths, args.rng, eos, warp,
                         max_new_tokens=args.max_new_tokens, fused=fused, sampling=sampling)
    state = run_chunked(
        lambda: _init_jit(graphdef, params, args.prompt, args.prompt_lengths, args.rng, eos, warp,
                          max_new_tokens=args.max_new_tokens, fused=fused),
        lambda state, limit: _run_jit(graphdef, params, state, eos, warp, limit, fused=fused, sampling=sampling),
        prompt_lengths=np.asarray(args.prompt_lengths), args=streaming)
    return _result_jit(state, args.prompt_lengths)
