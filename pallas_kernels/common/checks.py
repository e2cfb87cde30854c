"""Argument checks shared by every attention family.

They run on static shapes and dtypes before any kernel is built and raise a `ValueError` that names
the offending value.
"""

from __future__ import annotations

import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_HEAD_DIM = 256


def check_rank(name: str, shape: tuple[int, ...], rank: int) -> None:
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank}, got {name}.shape={tuple(shape)}")


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
