"""`generate_incremental`: the target decoding alone, one token per forward pass.

The baseline that speculative decoding must reproduce (greedy) or match in distribution
(sampling): same warping (`spec.sampling`), same result type, same stopping rules, and like the
speculative loop a single jit-compiled `lax.while_loop`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fa2jax import KVCache, Transformer
from spec.generation import (
    GenerationResult, GenerationStats, cache_len, call_model, check_generate_args, emit_tokens, first_token)
from spec.sampling import sample_probs, warp_probs


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


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(graphdef, params, prompt, prompt_lengths, temperature, top_p, rng, eos_id, *, max_new_tokens):
    batch, prompt_len = prompt.shape
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(batch, cache_len(model.config, prompt_len + max_new_tokens, 0))
    logits, cache = model.prefill(prompt, prompt_lengths, cache)
    rng, key = jax.random.split(rng)
    last = first_token(logits, prompt_lengths, key, temperature, top_p)
    buffer = jnp.zeros((batch, prompt_len + max_new_tokens), jnp.int32).at[:, :prompt_len].set(prompt)
    limit = prompt_lengths + max_new_tokens
    ones = jnp.ones((batch,), jnp.int32)
    buffer, lengths, done = emit_tokens(buffer, prompt_lengths, limit, jnp.zeros((batch,), bool), last[:, None],
                                        ones, eos_id)
    state = IncrementalState(tokens=buffer, lengths=lengths, limit=limit, last=last, done=done, cache=cache,
                             rng=rng, target_calls=jnp.array(1, jnp.int32))

    def step(s: IncrementalState) -> IncrementalState:
        rng, key = jax.random.split(s.rng)
        logits, cache = call_model(graphdef, params, "decode", s.last[:, None], s.cache)
        # Stopped rows do not advance their cache.
        cache = cache.replace(lengths=jnp.where(s.done, s.cache.lengths, cache.lengths))
        nxt = sample_probs(key, warp_probs(logits[:, 0], temperature, top_p))
        buffer, lengths, done = emit_tokens(s.tokens, s.lengths, s.limit, s.done, nxt[:, None], ones, eos_id)
        return s.replace(tokens=buffer, lengths=lengths, done=done, last=jnp.where(s.done, s.last, nxt),
                         cache=cache, rng=rng, target_calls=s.target_calls + 1)

    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)
    steps = state.target_calls - 1
    hist = jnp.zeros((2,), jnp.int32).at[1].set(state.lengths.sum() - prompt_lengths.sum() - batch)
    return GenerationResult(
        tokens=state.tokens, lengths=state.lengths,
        stats=GenerationStats(target_calls=state.target_calls, accepted_histogram=hist,
                              mean_accepted_length=jnp.where(steps > 0, 1.0, 0.0).astype(jnp.float32)))


def generate_incremental(target: Transformer, prompt, prompt_lengths, *, max_new_tokens: int,
                         temperature: float = 0.0, top_p: float = 1.0, rng=None,
                         eos_id: int | None = None) -> GenerationResult:
    """Decodes with the target alone, one token per forward pass.

    Args:
      target: the model.
      prompt: right-padded prompts.  # [B, P] int
      prompt_lengths: prompt length per row, 1 .. P.  # [B] int
      max_new_tokens: tokens per row at most.
      temperature: 0 for greedy (argmax), else sampling with `rng`.
      top_p: nucleus sampling mass in (0, 1].
      rng: PRNG key or int seed.
      eos_id: a row stops after emitting this token.

    Returns:
      GenerationResult: tokens [B, P + max_new_tokens], lengths [B], stats (one token per step).

    The cache holds P + max_new_tokens slots, whatever target.config.max_len is. Call it outside
    `jax.jit` (it compiles its own loop; a traced argument raises TypeError).
    """
    args = check_generate_args(
        prompt, prompt_lengths, vocab_size=target.config.vocab_size, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, rng=rng, eos_id=eos_id)
    graphdef, params = nnx.split(target)
    return _generate(graphdef, params, args.prompt, args.prompt_lengths, jnp.float32(args.temperature),
                     jnp.float32(args.top_p), args.rng, jnp.int32(args.eos_id),
                     max_new_tokens=args.max_new_tokens)
