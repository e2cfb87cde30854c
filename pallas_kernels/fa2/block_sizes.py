"""Block sizes: heuristics per head dim, dtype and GPU, an autotuner, and its JSON cache.

FA2 leaves block sizes to hand tuning. Here `block_sizes=None` looks up the cache shipped with the
package (measured on an H100, see BENCHMARKS.md), then a user cache written by `autotune`, then falls
back to `heuristic_block_sizes`. The cache key is (device kind, dtype, head dim, feature set).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

SHIPPED_CACHE = pathlib.Path(__file__).with_name("tuning_cache.json")
USER_CACHE_ENV = "FA2JAX_TUNING_CACHE"
MIN_BLOCK = 16  # the smallest tile a GPU matrix instruction takes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters of the forward, dK/dV and dQ kernels.

    Every block is a power of two >= 16 (Triton tiles). `num_warps` / `num_stages` are ignored by
    interpret mode.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{field.name} must be a positive int, got {value=}")
            if field.name.startswith("block_") and (value < MIN_BLOCK or value & (value - 1)):
                raise ValueError(f"BlockSizes.{field.name} must be a power of two >= {MIN_BLOCK}, got {value=}")

    def fitted(self, q_len: int, kv_len: int) -> "BlockSizes":
        """Shrinks blocks that exceed the (power-of-two rounded) sequence, so short inputs pad little."""
        q_cap = max(MIN_BLOCK, _next_power_of_2(q_len))
        k_cap = max(MIN_BLOCK, _next_power_of_2(kv_len))
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, q_cap),
            block_k=min(self.block_k, k_cap),
            block_q_dkv=min(self.block_q_dkv, q_cap),
            block_k_dkv=min(self.block_k_dkv, k_cap),
            block_q_dq=min(self.block_q_dq, q_cap),
            block_k_dq=min(self.block_k_dq, k_cap),
        )


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def heuristic_block_sizes(head_dim: int, dtype, device_kind: str) -> BlockSizes:
    """Block sizes that are good without measurement.

    Register pressure grows with the (padded) head dim: the forward accumulator is
    block_q x D float32, so large heads take smaller query tiles. CPU interpret mode gets small tiles
    to keep padding and Python-level work low.
    """
    if "cpu" in device_kind.lower():
        return BlockSizes(block_q=32, block_k=32, block_q_dkv=32, block_k_dkv=32, block_q_dq=32, block_k_dq=32)
    # Measured on an H100 (bf16, D=128, see BENCHMARKS.md): 128x128 forward tiles with 8 warps and
    # 3 stages, and 64x64 backward tiles with 4 warps beat every other candidate; 8-warp backward
    # tiles spill. Smaller heads afford the same tiles; D=256 halves them to stay in registers.
    if jnp.dtype(dtype).itemsize > 2:  # float32 tiles take twice the shared memory per stage
        return BlockSizes(block_q=64, block_k=64 if head_dim <= 64 else 32, num_warps=4, num_stages=2,
                          block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32,
                          num_warps_bwd=4, num_stages_bwd=1)
    if head_dim <= 128:
        return BlockSizes(block_q=128, block_k=128 if head_dim > 64 else 64, num_warps=8, num_stages=3,
                          block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64,
                          num_warps_bwd=4, num_stages_bwd=2)
    return BlockSizes(block_q=64, block_k=64, num_warps=8, num_stages=2,
                      block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32,
                      num_warps_bwd=4, num_stages_bwd=1)


def cache_key(device_kind: str, dtype, head_dim: int, features: tuple[str, ...]) -> str:
    """'NVIDIA H100 80GB HBM3|bfloat16|128|causal,segments' -- features sorted, empty for plain."""
    return "|".join([device_kind, jnp.dtype(dtype).name, str(head_dim), ",".join(sorted(features))])


def _user_cache_path() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "fa2jax" / "tuning_cache.json"
    return pathlib.Path(os.environ.get(USER_CACHE_ENV, default))


def _read_cache(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def lookup_block_sizes(device_kind: str, dtype, head_dim: int, features: tuple[str, ...]) -> BlockSizes:
    """User cache, then the shipped cache, then the heuristic; a cached feature set falls back to plain."""
    caches = [_read_cache(_user_cache_path()), _read_cache(SHIPPED_CACHE)]
    for key in (cache_key(device_kind, dtype, head_dim, features), cache_key(device_kind, dtype, head_dim, ())):
        for cache in caches:
            if key in cache:
                return BlockSizes(**cache[key])
    return heuristic_block_sizes(head_dim, dtype, device_kind)


def candidate_block_sizes(head_dim: int) -> list[BlockSizes]:
    """The grid autotune searches: forward and backward tiles and launch parameters."""
    candidates = []
    for block_q, block_k in ((128, 64), (128, 128), (64, 64), (64, 128), (128, 32)):
        for num_warps in (4, 8):
            for num_stages in (2, 3):
                for bwd_q, bwd_k in ((64, 64), (64, 128), (128, 64), (32, 64)):
                    if head_dim > 128 and (block_q * block_k > 64 * 64 or bwd_q * bwd_k > 32 * 64):
                        continue
                    candidates.append(BlockSizes(
                        block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                        block_q_dkv=bwd_q, block_k_dkv=bwd_k, block_q_dq=bwd_k, block_k_dq=bwd_q,
                        num_warps_bwd=num_warps, num_stages_bwd=min(num_stages, 2)))
    return candidates


def _median_seconds(fn: Callable[[], jax.Array], repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def autotune(q, k, v, *, candidates: list[BlockSizes] | None = None, repeats: int = 10,
             include_backward: bool = True, save: bool = True, **attention_kwargs) -> BlockSizes:
    """Times candidate block sizes on the current device and caches the fastest.

    Args:
      q, k, v: representative inputs ([B, T, H, D], [B, S, K, D]).
      candidates: block sizes to try (default `candidate_block_sizes(D)`).
      repeats: timed runs per candidate (median taken).
      include_backward: time forward + backward (training) instead of forward alone.
      save: write the winner into the user cache (`$FA2JAX_TUNING_CACHE` or ~/.cache/fa2jax/).
      **attention_kwargs: the feature arguments of `flash_attention` (causal, window_size, ...).

    Returns:
      The fastest BlockSizes; candidates that fail to compile are skipped with a log line.
    """
    from pallas_kernels.fa2.api import feature_names, flash_attention

    device_kind = jax.devices()[0].device_kind
    candidates = candidates or candidate_block_sizes(q.shape[-1])
    best, best_time = None, float("inf")
    for blocks in candidates:
        def run(blocks=blocks):
            if include_backward:
                return jax.grad(lambda q, k, v: flash_attention(
                    q, k, v, block_sizes=blocks, **attention_kwargs).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2))(q, k, v)
            return flash_attention(q, k, v, block_sizes=blocks, **attention_kwargs)
        fn = jax.jit(run)
        try:
            seconds = _median_seconds(fn, repeats)
        except Exception as error:  # a candidate that does not compile (e.g. out of shared memory)
            logger.info("autotune: %s failed: %s", blocks, error)
            continue
        logger.info("autotune: %s took %.1f us", blocks, seconds * 1e6)
        if seconds < best_time:
            best, best_time = blocks, seconds
    if best is None:
        raise ValueError(f"no candidate block size ran on {device_kind=}")
    if save:
        path = _user_cache_path()
        cache = _read_cache(path)
        key = cache_key(device_kind, q.dtype, q.shape[-1], feature_names(**attention_kwargs))
        cache[key] = dataclasses.asdict(best)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    return best
