"""Tile sizes and the split-KV heuristic for the tree-attention kernel.

The defaults follow the usual FA2-on-Triton shape for head dim 128 (128 query rows, 64 keys per step,
8 warps); they were chosen without an H100 at hand and are meant to be revised from the benchmark's
`--tune` sweep (benchmarks/tree_attention.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

DEFAULT_NUM_SMS = 132  # H100 SXM
MAX_SPLITS = 64


def _is_power_of_two(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def next_power_of_two(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class TreeAttentionConfig:
    """Static kernel parameters.

    Attributes:
        block_rows: query rows per program. A row is one (node, query head) pair; the N * G rows of a
            KV head are cut into ceil(N * G / block_rows) programs, each reading that head's K/V.
        block_k: prefix keys per step of the online-softmax loop.
        num_warps / num_stages: Triton launch parameters.
    """

    block_rows: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_rows", "block_k"):
            value = getattr(self, name)
            if not (_is_power_of_two(value) and value >= 16):
                raise ValueError(f"{name} must be a power of two >= 16, got {name}={value}")
        if not _is_power_of_two(self.num_warps):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps=}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages=}")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "TreeAttentionConfig":
        """Preset by padded head dim: small heads afford more rows per warp."""
        if head_dim <= 64:
            return cls(block_rows=128, block_k=64, num_warps=4, num_stages=3)
        return cls()


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    """Streaming multiprocessors of the default device (132 when unknown, e.g. on CPU)."""
    try:
        count = getattr(jax.devices()[0], "core_count", None)
    except RuntimeError:
        count = None
    return int(count) if count else DEFAULT_NUM_SMS


def num_splits_heuristic(*, batch: int, num_kv_heads: int, row_blocks: int, cache_size: int, block_k: int,
                         sm_count: int | None = None) -> int:
    """Flash-decoding split count: enough programs for about two per SM, never a split under two blocks.

    Programs without splitting are B * K * row_blocks. When they already fill about one wave of the
    GPU, one split avoids writing f32 partials and the combine. Otherwise split the prefix so that the grid
    holds about two programs per SM, but keep each split at >= 2 blocks of a full cache (the actual
    prefix is only known at run time; splits of a shorter prefix are shorter, not fewer).
    """
    sm_count = sm_count or num_sms()
    programs = batch * num_kv_heads * row_blocks
    if 10 * programs >= 9 * sm_count:
        return 1
    wanted = -(-2 * sm_count // programs)
    most = max(1, cache_size // (2 * block_k))
    return max(1, min(wanted, most, MAX_SPLITS))
