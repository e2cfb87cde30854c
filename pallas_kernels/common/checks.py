"""Argument checks shared by every attention family.

They run on static shapes, dtypes and Python numbers before any kernel is built and raise a
`ValueError` (a bad value) or `TypeError` (a value of the wrong kind, e.g. a traced scalar where
the kernel needs a static one) that names the offending argument.
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_HEAD_DIM = 256


def check_rank(name: str, shape: tuple[int, ...], rank: int) -> None:
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank}, got {name}.shape={tuple(shape)}")


def check_nonempty(name: str, shape: tuple[int, ...]) -> None:
    """A zero-size axis (B = 0, T = 0, ...) has no kernel grid: say so instead of failing inside one."""
    if any(d == 0 for d in shape):
        raise ValueError(f"{name} has a zero-size dimension, every dimension must be >= 1: {name}.shape={tuple(shape)}")


# What converting a traced value to a Python number raises (ConcretizationTypeError's subclasses included).
_TRACED_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError)


def _traced_error(name: str, value) -> TypeError:
    return TypeError(
        f"{name} must be a static Python number, got a traced value ({name}={value}): the kernel is "
        f"specialised on it. Under jax.jit, pass it through functools.partial or static_argnames instead "
        f"of as a traced argument")


def static_float(name: str, value) -> float:
    """`value` as a Python float: a Python/NumPy real or a concrete scalar array, never a tracer."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
        raise TypeError(f"{name} must be a real number, got {name}={value!r}")
    try:
        return float(value)
    except _TRACED_ERRORS:
        raise _traced_error(name, value) from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {name}={value!r}") from None


def static_int(name: str, value) -> int:
    """`value` as a Python int, never a float (no silent truncation of 1.5) nor a tracer."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {name}={value!r}")
    try:
        return operator.index(value)
    except _TRACED_ERRORS:
        raise _traced_error(name, value) from None
    except TypeError:
        raise TypeError(f"{name} must be an int, got {name}={value!r} of type {type(value).__name__}") from None


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {name}={value}")


def check_heads_and_dtypes(arrays: dict) -> None:
    """GQA head counts, head dim and one supported dtype.

    `arrays` maps names to the query and key/value arrays ([B, T, H, D] first, then [B, S, K, D]).
    """
    (q_name, q), (_, k), *_ = arrays.items()
    num_heads, head_dim, num_kv_heads = q.shape[2], q.shape[3], k.shape[2]
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"query heads must be a multiple of KV heads, got {num_heads=} and {num_kv_heads=}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim=}")
    for name, x in arrays.items():
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={jnp.dtype(x.dtype)} is not one of float32, bfloat16, float16")
    if len({jnp.dtype(x.dtype) for x in arrays.values()}) != 1:
        described = ", ".join(f"{name}.dtype={jnp.dtype(x.dtype)}" for name, x in arrays.items())
        raise ValueError(f"{', '.join(arrays)} must share a dtype, got {described}")
