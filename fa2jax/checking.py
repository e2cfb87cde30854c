"""Checks of the model's data-dependent inputs, eager where the values are known and under checkify
otherwise, and `checked`, the wrapper that turns the latter on.

A check that needs the values of an array (a token id past the vocabulary, a cache about to
overflow) raises a `ValueError` at the call when the array is concrete (NumPy, or a jax.Array
outside `jit`). Inside `jit` the values are unknown at trace time: the same condition is then a
`checkify.debug_check`, which costs nothing in a plain `jit` and becomes a real check when the
function is wrapped in `checked` (`jax.experimental.checkify`). Without `checked`, a traced misuse
is not caught: an out-of-range token id embeds as NaN (or wraps around when negative), and tokens
past the cache's end are dropped.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


def checked(fn: Callable) -> Callable:
    """`fn` with the data-dependent checks of fa2jax's model turned on, inside or outside `jit`.

    Wraps `fn` in `checkify.checkify` with the user checks: the wrapped function returns
    `(error, out)`, and `error.throw()` raises a `checkify.JaxRuntimeError` naming the first failed
    check (token ids outside [0, vocab_size), prefill lengths outside [0, T], a decode or tree pass
    past the cache's end, a tree mask that is not a tree). Example:

        error, (logits, cache) = jax.jit(fa2jax.checked(lambda t, c: model.decode(t, c)))(tokens, cache)
        error.throw()

    Tree attention kernels have their own: `pallas_kernels.checked_tree_attention`.
    """
    return checkify.checkify(fn, errors=checkify.user_checks)


def concrete(x) -> np.ndarray | None:
    """x as a NumPy array, or None when its values are unknown at trace time (a tracer)."""
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_token_ids(tokens: jax.Array, vocab_size: int, name: str, valid: jax.Array | None = None) -> None:
    """Token ids in [0, vocab_size), where `valid` (bool, tokens' shape; None = everywhere) says so."""
    in_range = (tokens >= 0) & (tokens < vocab_size)
    if valid is not None:
        in_range = in_range | ~valid
    values, ok = concrete(tokens), concrete(in_range)
    if values is not None and ok is not None:
        if not ok.all():
            bad = values[~ok]
            raise ValueError(f"{name} must be token ids in [0, {vocab_size=}), got {name} values "
                             f"{bad[:8].tolist()} (first bad at index {np.argwhere(~ok)[0].tolist()})")
        return
    checkify.debug_check(jnp.all(in_range), f"{name} must be token ids in [0, vocab_size={vocab_size}), got "
                         "values from {lo} to {hi}", lo=jnp.min(tokens), hi=jnp.max(tokens))


def check_cache_room(lengths: jax.Array, needed: int, max_len: int, what: str) -> None:
    """lengths[b] + needed <= max_len: `needed` slots past each row's committed tokens fit the cache."""
    values = concrete(lengths)
    if values is not None:
        if values.size and int(values.max()) + needed > max_len:
            b = int(np.argmax(values))
            raise ValueError(
                f"{what} past the cache's end: row {b} holds cache.lengths[{b}]={int(values[b])} tokens and the call "
                f"writes {needed} more, but cache.max_len={max_len}; make the cache larger (init_cache(batch, "
                f"max_len)) or stop earlier")
        return
    checkify.debug_check(jnp.all(lengths + needed <= max_len),
                         f"{what} past the cache's end: cache.lengths + {needed} must be <= "
                         f"cache.max_len={max_len}, got cache.lengths={{lengths}}", lengths=lengths)


def check_batch(name: str, batch: int, cache_batch: int) -> None:
    if batch != cache_batch:
        raise ValueError(f"{name} has batch {batch} but the cache holds {cache_batch} rows: {name}.shape[0]={batch}, "
                         f"cache.batch={cache_batch}")
