"""The block-size autotuner of `flash_attention`: times candidates on the device, caches the fastest.

It sits above the API: it calls `flash_attention` (passed in, the public one by default) with each
candidate `BlockSizes` and writes the winner through `block_sizes.save_block_sizes`, where the API's
lookup finds it on the next call. The API itself reads only `block_sizes`, so nothing imports back.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.common.device import device_kind as current_device_kind
from pallas_kernels.common.timing import median_time
from pallas_kernels.fa2.api import flash_attention
from pallas_kernels.fa2.block_sizes import (
    BlockSizes,
    cache_key,
    candidate_block_sizes,
    feature_names,
    save_block_sizes,
)

logger = logging.getLogger(__name__)


def autotune(q, k, v, *, candidates: list[BlockSizes] | None = None, repeats: int = 10,
             include_backward: bool = True, save: bool = True, attention: Callable = flash_attention,
             **attention_kwargs) -> BlockSizes:
    """Times candidate block sizes on the current device and caches the fastest.

    Args:
      q, k, v: representative inputs ([B, T, H, D], [B, S, K, D]).
      candidates: block sizes to try (default `candidate_block_sizes(D)`).
      repeats: timed runs per candidate (median taken).
      include_backward: time forward + backward (training) instead of forward alone.
      save: write the winner into the user cache (`$FA2JAX_TUNING_CACHE` or ~/.cache/fa2jax/).
      attention: the function timed, called as attention(q, k, v, block_sizes=..., **attention_kwargs).
      **attention_kwargs: the feature arguments of `flash_attention` (causal, window_size, ...).

    Returns:
      The fastest BlockSizes; candidates that fail to compile are skipped with a log line.
    """
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
        save_block_sizes(cache_key(device_kind, q.dtype, q.shape[-1], feature_names(**attention_kwargs)), best)
    return best
