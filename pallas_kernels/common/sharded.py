"""Running an attention kernel per shard: `jax.shard_map` over batch, heads and (for ring attention) the sequence.

A `pallas_call` is opaque to XLA's SPMD partitioner: inside a sharded program it is run on whole
(gathered) operands on every device. Attention needs no communication across batch rows or across
KV-head groups, so each device can run the kernel on its own rows and heads; `shard_attention`
does that with `jax.shard_map` (what JAX documents for custom kernels in sharded programs), so no
operand is gathered.

Operands are described by layout strings, one letter per axis: `B` is split over the batch mesh
axes, `H` and `K` (query heads, KV heads) over the head mesh axes, every other letter is kept
whole, except `T` and `S` (query and key positions) when a sequence axis is given: only ring
attention can run on such shards, since its kernel passes the K/V chunks between the devices
itself (`pallas_kernels.fa2.ring`). GQA: query head h belongs to KV head h // G, so splitting H
and K into the same number of contiguous blocks keeps whole groups on each device;
`AttentionSharding.check` asks K (and so H) to be divisible by the head axes' size.

This module imports no kernel family: callers pass the kernel function in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

_BATCH_LETTER = "B"
_HEAD_LETTERS = frozenset("HK")
_SEQUENCE_LETTERS = frozenset("TS")


@dataclasses.dataclass(frozen=True)
class AttentionSharding:
    """How an attention call's operands are split over a mesh.

    Attributes:
      mesh: the concrete or abstract mesh (under `jax.set_mesh` inside jit, the abstract one).
      batch_axes: mesh axes the batch axis B is split over (their product divides B).
      head_axes: mesh axes the head axes H and K are split over (their product divides K).
      sequence_axes: mesh axes the positions T and S are split over (ring attention only).
    """

    mesh: Mesh | AbstractMesh
    batch_axes: tuple[str, ...] = ()
    head_axes: tuple[str, ...] = ()
    sequence_axes: tuple[str, ...] = ()

    def __post_init__(self):
        names = tuple(self.mesh.axis_names)
        for axis in self.batch_axes + self.head_axes + self.sequence_axes:
            if axis not in names:
                raise ValueError(f"{axis=} is not an axis of the mesh, {names=}")
        groups = (self.batch_axes, self.head_axes, self.sequence_axes)
        if len(set().union(*groups)) != sum(map(len, groups)):
            raise ValueError(f"a mesh axis can split only one of batch, heads and sequence: {self.batch_axes=} "
                             f"{self.head_axes=} {self.sequence_axes=}")

    def _size(self, axes: tuple[str, ...]) -> int:
        return math.prod(dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))[a] for a in axes)

    @property
    def batch_shards(self) -> int:
        return self._size(self.batch_axes)

    @property
    def head_shards(self) -> int:
        return self._size(self.head_axes)

    @property
    def sequence_shards(self) -> int:
        return self._size(self.sequence_axes)

    def spec(self, layout: str) -> PartitionSpec:
        """The PartitionSpec of an operand laid out as `layout`, e.g. "BTHD" or "BHT"."""
        def axis(letter):
            if letter == _BATCH_LETTER and self.batch_axes:
                return self.batch_axes
            if letter in _HEAD_LETTERS and self.head_axes:
                return self.head_axes
            if letter in _SEQUENCE_LETTERS and self.sequence_axes:
                return self.sequence_axes
            return None
        return PartitionSpec(*(axis(letter) for letter in layout))

    def check(self, batch: int, num_heads: int, num_kv_heads: int) -> None:
        """Raises ValueError unless the shards hold whole batch rows and whole KV-head groups."""
        if batch % self.batch_shards:
            raise ValueError(f"batch {batch} does not split over {self.batch_axes=} "
                             f"({self.batch_shards} shards)")
        if num_kv_heads % self.head_shards or num_heads % self.head_shards:
            raise ValueError(f"{num_heads=} / {num_kv_heads=} do not split over {self.head_axes=} "
                             f"({self.head_shards} shards) with whole KV groups on each")

    @property
    def trivial(self) -> bool:
        """True when nothing is split (one shard): the kernel can run as it is."""
        return self.batch_shards == 1 and self.head_shards == 1 and self.sequence_shards == 1


def shard_attention(
    kernel: Callable[..., Any],
    sharding: AttentionSharding,
    operands: Sequence[tuple[Any, str]],
    out_layouts: str | tuple[str, ...],
) -> Any:
    """Runs `kernel(*operands)` once per shard of `sharding`'s mesh and reassembles its outputs.

    Args:
      kernel: a function of the operands' shards (positional, in order) returning one array or a
        tuple; it must not depend on which shard it runs on (attention per row and head does not),
        except through collectives over the sequence axes (ring attention's K/V passing).
      sharding: how B, H/K (and T/S) are split.
      operands: (array, layout) pairs; an array of None is passed to the kernel as None, and an
        operand whose layout has no split letter (e.g. a shared [N, N] mask) is replicated.
      out_layouts: the layout of the output, or of each output of a tuple.

    Returns:
      What `kernel` returns, as global arrays laid out as `out_layouts`.
    """
    present = [i for i, (x, _) in enumerate(operands) if x is not None]
    arrays = tuple(operands[i][0] for i in present)
    in_specs = tuple(sharding.spec(operands[i][1]) for i in present)
    single = isinstance(out_layouts, str)
    out_specs = sharding.spec(out_layouts) if single else tuple(sharding.spec(o) for o in out_layouts)

    def per_shard(*shards):
        args = [None] * len(operands)
        for i, shard in zip(present, shards):
            args[i] = shard
        return kernel(*args)

    # check_vma=False: a pallas_call's outputs carry no varying-axes annotation, and every output
    # here varies exactly as out_specs say (each shard computes its own rows and heads).
    mapped = jax.shard_map(per_shard, mesh=sharding.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
    return mapped(*arrays)
