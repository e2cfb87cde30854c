"""Tile sizes and the split-KV heuristic for the tree-attention kernel.

The defaults start from the forward tiles that `flash_attention` measured on an H100 (the prefix loop
is the same FA2 loop); the tile sweep of benchmarks/tree_attention.py (`--tune`) on an H100 kept them
(BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.common.device import num_sms
from pallas_kernels.common.numerics import is_power_of_two, next_power_of_two

MAX_SPLITS = 64


@dataclasses.dataclass(frozen=True)
class TreeAttentionConfig:
    """Static kernel parameters.

    Attributes:
        block_rows: query rows per program. A row is one (node, query head) pair; the N * G rows of a
            KV head are cut into whole-node blocks of this many rows (see RowTiling), each program
            reading that head's K/V. Fewer when the tree is small, more when one group is larger.
        block_k: prefix keys per step of the online-softmax loop.
        num_warps / num_stages: Triton launch parameters.
    """

    block_rows: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_rows", "block_k"):
            value = getattr(self, name)
            if not (is_power_of_two(value) and value >= 16):
                raise ValueError(f"{name} must be a power of two >= 16, got {name}={value}")
        if not is_power_of_two(self.num_warps):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps=}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages=}")

    @classmethod
    def heuristic(cls, head_dim: int, dtype, rows: int) -> "TreeAttentionConfig":
        """Defaults by padded head dim, dtype and the rows of one KV head (N * Gp).

        The prefix loop is FA2's forward loop, so large trees start from the forward tiles measured
        for `flash_attention` on an H100 (bf16, D=128: 128 x 128 tiles, 8 warps, 3 stages; see
        fa2/block_sizes.py). Small trees (decode: rows <= 64) are memory-bound: half-size
        key tiles and 4 warps leave shared memory for two programs per SM, which the split heuristic
        assumes. float32 tiles take twice the shared memory per stage; D=256 halves the rows.
        """
        if jnp.dtype(dtype).itemsize > 2:
            return cls(block_rows=64, block_k=32 if head_dim > 64 else 64, num_warps=4, num_stages=2)
        if head_dim > 128:
            return cls(block_rows=64, block_k=64, num_warps=8, num_stages=2)
        if rows <= 64:
            return cls(block_rows=64, block_k=64, num_warps=4, num_stages=3)
        return cls(block_rows=128, block_k=64 if head_dim <= 64 else 128, num_warps=8, num_stages=3)


@dataclasses.dataclass(frozen=True)
class RowTiling:
    """How the N * G query rows of one KV head are cut into programs.

    The kernel reads q as [B, N, K, Gp, D] (a free reshape of [B, N, H, D] when G is a power of two;
    otherwise the heads of each group are zero-padded to Gp). A program takes `nodes_per_block`
    consecutive nodes with all Gp heads of its group: block_rows = nodes_per_block * Gp rows, row r
    being node r // Gp, head r % Gp. Trailing nodes of the last block are masked.
    """

    num_nodes: int  # N
    group: int  # G, query heads per KV head
    padded_group: int  # Gp, the next power of two
    block_rows: int
    nodes_per_block: int
    node_blocks: int

    @property
    def padded_rows(self) -> int:
        return self.node_blocks * self.block_rows

    @property
    def padded_nodes(self) -> int:
        return self.node_blocks * self.nodes_per_block


def row_tiling(num_nodes: int, group: int, block_rows: int) -> RowTiling:
    """At most `block_rows` rows per program (more only when one group alone is larger), >= 16."""
    padded_group = next_power_of_two(group)
    rows = max(16, padded_group, min(block_rows, next_power_of_two(num_nodes * padded_group)))
    nodes_per_block = rows // padded_group
    return RowTiling(num_nodes=num_nodes, group=group, padded_group=padded_group, block_rows=rows,
                     nodes_per_block=nodes_per_block, node_blocks=-(-num_nodes // nodes_per_block))


def num_splits_heuristic(*, batch: int, num_kv_heads: int, row_blocks: int, cache_size: int, block_k: int,
                         block_rows: int = 128, sm_count: int | None = None) -> int:
    """Flash-decoding split count: fill one wave of the GPU, never a split under two blocks.

    Programs without splitting are B * K * row_blocks. A 128-row program holds one SM (its
    accumulator and scores fill the register file), a 64-row or smaller one about two. When the
    programs already fill about one wave, one split avoids writing f32 partials and the combine.
    Otherwise split the prefix into as many parts as still fit in one wave (a second, partial wave
    would cost as much as a full one), keeping each split at >= 2 blocks of a full cache (the actual
    prefix is only known at run time; splits of a shorter prefix are shorter, not fewer).
    """
    sm_count = sm_count or num_sms()
    slots = sm_count * (2 if block_rows <= 64 else 1)
    programs = batch * num_kv_heads * row_blocks
    if 10 * programs >= 9 * slots:
        return 1
    most = max(1, cache_size // (2 * block_k))
    return max(1, min(slots // programs, most, MAX_SPLITS))
