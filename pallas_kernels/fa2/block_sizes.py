"""Block sizes of the portable kernels: the config, heuristics per head dim, dtype and GPU, and the cache.

FA2 leaves block sizes to hand tuning. Here `block_sizes=None` looks up the cache shipped with the
package (measured on an H100, see BENCHMARKS.md), then a user cache written by the autotuner
(`tuning.autotune`, which sits above the API and writes through `save_block_sizes`), then falls back
to `heuristic_block_sizes`. The cache key is (device kind, dtype, head dim, feature set). This module
imports no other part of the package but `common`, so the API and the autotuner both read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax.numpy as jnp

from pallas_kernels.common.numerics import next_power_of_two

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
        q_cap = max(MIN_BLOCK, next_power_of_two(q_len))
        k_cap = max(MIN_BLOCK, next_power_of_two(kv_len))
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, q_cap),
            block_k=min(self.block_k, k_cap),
            block_q_dkv=min(self.block_q_dkv, q_cap),
            block_k_dkv=min(self.block_k_dkv, k_cap),
            block_q_dq=min(self.block_q_dq, q_cap),
            block_k_dq=min(self.block_k_dq, k_cap),
        )


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


def feature_names(*, causal=False, window_size=(-1, -1), segment_ids=None, softcap=0.0,
                  alibi_slopes=None, mask=None, dropout_rate=0.0, **_) -> tuple[str, ...]:
    """The feature set of a call, as used in the tuning-cache key."""
    present = {
        "causal": causal,
        "window": tuple(window_size) != (-1, -1),
        "segments": segment_ids is not None,
        "softcap": softcap > 0,
        "alibi": alibi_slopes is not None,
        "mask": mask is not None,
        "dropout": dropout_rate > 0,
    }
    return tuple(name for name, on in present.items() if on)


def cache_key(device_kind: str, dtype, head_dim: int, features: tuple[str, ...]) -> str:
    """'NVIDIA H100 80GB HBM3|bfloat16|128|causal,segments' -- features sorted, empty for plain."""
    return "|".join([device_kind, jnp.dtype(dtype).name, str(head_dim), ",".join(sorted(features))])


def user_cache_path() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "fa2jax" / "tuning_cache.json"
    return pathlib.Path(os.environ.get(USER_CACHE_ENV, default))


def _read_cache(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def lookup_block_sizes(device_kind: str, dtype, head_dim: int, features: tuple[str, ...]) -> BlockSizes:
    """User cache, then the shipped cache, then the heuristic; a cached feature set falls back to plain."""
    caches = [_read_cache(user_cache_path()), _read_cache(SHIPPED_CACHE)]
    for key in (cache_key(device_kind, dtype, head_dim, features), cache_key(device_kind, dtype, head_dim, ())):
        for cache in caches:
            if key in cache:
                return BlockSizes(**cache[key])
    return heuristic_block_sizes(head_dim, dtype, device_kind)


def save_block_sizes(key: str, blocks: BlockSizes, path: pathlib.Path | None = None) -> None:
    """Writes `blocks` under `key` into the user cache (atomically: a temporary file, then a rename)."""
    path = user_cache_path() if path is None else path
    cache = _read_cache(path)
    cache[key] = dataclasses.asdict(blocks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(path)


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
