"""Sharding a `Transformer` over a device mesh: data parallel, FSDP and tensor parallel.

A mesh is described by a string of named axes, `parse_mesh("data=2,fsdp=2,model=2")`. The axis
names choose the parallelism (MaxText's convention):

  data     batch rows split; parameters and optimizer state replicated      (data parallel)
  fsdp     batch rows split; parameters and optimizer state split too, on   (fully sharded data
           their model-width axis, and gathered by XLA where a layer needs   parallel, ZeRO-3)
           them
  context  the sequence split: activations by position, attention as      (context parallel,
           ring attention (`pallas_kernels.fa2.ring`) over a zig-zag token   ring attention)
           order; parameters replicated
  model    attention heads, MLP hidden units and the vocabulary split        (tensor parallel,
           (Megatron: column-split projections in, row-split out)            Megatron-LM)

Every parameter gets logical axis names from `PARAM_AXES` (a table of path patterns, so no layer
needs to know about meshes), and `LOGICAL_AXES` maps those names to mesh axes. Optimizer states
hold copies of the parameter tree (Adam's moments), so the same patterns shard them: a leaf is
matched by the end of its tree path. Activations are constrained to `ACTIVATION_AXES` between
blocks (`constrain`), and the attention kernels run per shard of batch rows and heads
(`attention_partition`, used by `fa2jax.attention`). With a `context` axis the Transformer lays
its tokens out in zig-zag order once at the input and its attention runs as ring attention over
that axis (`ring_partition`, `context_shards`; see `fa2jax.Transformer.__call__`).

The mesh of a traced program is JAX's context mesh (`with jax.set_mesh(mesh):` around the jitted
calls): `constrain` and `attention_partition` read it, and do nothing without one.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pallas_kernels.common.sharded import AttentionSharding

logger = logging.getLogger(__name__)

# Known mesh axes, in the order they are laid out over the devices: the last varies fastest, so
# "model" (the most communication per step) spans neighbouring devices (one NVLink island).
MESH_AXES = ("data", "fsdp", "context", "model")
# The mesh axis of context parallelism (the one axis of the logical "seq").
CONTEXT_AXIS = "context"

# Logical axis -> the mesh axes it is split over (those present in the mesh).
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (CONTEXT_AXIS,),
    "embed": ("fsdp",),  # the model width of a parameter: FSDP's split
    "vocab": ("model",),
    "heads": ("model",),
    "kv_heads": ("model",),
    "mlp": ("model",),
    "head_dim": (),
    "norm": (),
    "act_embed": (),  # the model width of an activation: whole on every device
    "embed_table": (),
}

# Parameter path pattern (matched at the end of the "/"-joined tree path) -> logical axes of its
# dims. Parameters matching none are replicated (matrices with a log line: they cost memory).
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed/embedding", ("vocab", "embed_table")),
    (r"attn/query/kernel", ("embed", "heads", "head_dim")),
    (r"attn/(key|value)/kernel", ("embed", "kv_heads", "head_dim")),
    (r"attn/query/bias", ("heads", "head_dim")),
    (r"attn/(key|value)/bias", ("kv_heads", "head_dim")),
    (r"attn/out/kernel", ("heads", "head_dim", "embed")),
    (r"mlp/(gate|up)/kernel", ("embed", "mlp")),
    (r"mlp/down/kernel", ("mlp", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"mlp/(gate|up)/bias", ("mlp",)),
    (r"\w*norm/scale", ("norm",)),
    (r"(attn/out|mlp/down)/bias", ("norm",)),
)
_PARAM_PATTERNS = tuple((re.compile(rf"(^|/){pattern}$"), axes) for pattern, axes in PARAM_AXES)

# The residual stream [B, T, d_model] between blocks.
ACTIVATION_AXES = ("batch", "seq", "act_embed")


def parse_mesh(description: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) from a description like "data=2,fsdp=2,model=2".

    Axes may be given in any order and are laid out in `MESH_AXES` order; an axis not named has
    size 1 (and is left out). The sizes must multiply to the number of devices.

    Raises:
      ValueError: an unknown axis name, a repeated axis, a size that is not a positive int, or
        sizes whose product differs from the device count.
    """
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"a mesh description looks like 'data=2,model=2', got {description=}")
    devices = list(jax.devices() if devices is None else devices)
    sizes: dict[str, int] = {}
    for part in description.split(","):
        name, sep, size = (s.strip() for s in part.partition("="))
        if not sep or not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh axis {part!r} of {description=} is not name=size with a positive size")
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {description=}: the axes are {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} given twice in {description=}")
        sizes[name] = int(size)
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"{description=} spans {math.prod(sizes.values())} devices, but there are "
                         f"{len(devices)}")
    names = tuple(a for a in MESH_AXES if a in sizes)
    shape = tuple(sizes[a] for a in names)
    # Auto axes: XLA propagates shardings through the model's ops; only the parameters, the
    # batch and the attention kernels say where they live.
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _mesh_axes(mesh, logical: str | None, usable=None) -> tuple[str, ...]:
    """The mesh axes of logical axis `logical` that are in `mesh` with size > 1 (and `usable`)."""
    if logical is None:
        return ()
    if logical not in LOGICAL_AXES:
        raise ValueError(f"unknown logical axis {logical!r}: the axes are {sorted(LOGICAL_AXES)}")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return tuple(a for a in LOGICAL_AXES[logical]
                 if sizes.get(a, 1) > 1 and (usable is None or a in usable))


def logical_spec(logical: Sequence[str | None], shape: Sequence[int], mesh, what: str = "array") -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dims have logical axes `logical`.

    Raises:
      ValueError: a dim does not divide evenly over its mesh axes (names `what`, the dim and axes),
        or the number of logical axes differs from the rank.
    """
    if len(logical) != len(shape):
        raise ValueError(f"{what}: {len(logical)} logical axes {tuple(logical)} for a rank-{len(shape)} {shape=}")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    entries, used = [], set()
    for name, dim in zip(logical, shape):
        axes = tuple(a for a in _mesh_axes(mesh, name) if a not in used)
        split = math.prod(sizes[a] for a in axes)
        if dim % split:
            raise ValueError(f"{what}: dim {dim} (logical {name!r}) does not split over mesh axes {axes} "
                             f"of total size {split}; choose a mesh whose sizes divide it")
        used.update(axes)
        entries.append(axes if len(axes) > 1 else axes[0] if axes else None)
    return PartitionSpec(*entries)


def _path_string(path) -> str:
    """A tree path as "a/b/0/c", without the `value` attribute of nnx Variables."""
    keys = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                keys.append(str(getattr(key, attr)))
                break
    if keys and keys[-1] == "value":
        keys.pop()
    return "/".join(keys)


def param_logical_axes(path: str, ndim: int) -> tuple[str, ...] | None:
    """The logical axes of the parameter (or optimizer moment) at tree path `path`, or None."""
    for pattern, axes in _PARAM_PATTERNS:
        if pattern.search(path):
            return axes if len(axes) == ndim else None
    return None


@functools.cache
def _log_unmatched(path: str, shape: tuple[int, ...]) -> None:
    logger.warning("fa2jax.sharding: no PARAM_AXES rule for %s %s: replicated on every device", path, shape)


def tree_specs(tree: Any, mesh) -> Any:
    """PartitionSpecs for every array leaf of `tree`: model parameters, an optax state over them,
    a TrainState, or a dict of those (leaves matched by the end of their tree path)."""
    def spec(path, leaf):
        shape = tuple(np.shape(leaf))
        name = _path_string(path)
        axes = param_logical_axes(name, len(shape))
        if axes is None:
            if len(shape) >= 2:
                _log_unmatched(name, shape)
            return PartitionSpec()
        return logical_spec(axes, shape, mesh, what=name)
    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """`tree_specs` as NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, mesh),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard(tree: Any, mesh: Mesh) -> Any:
    """`tree` placed on `mesh` by `tree_shardings` (each device receives only its shards)."""
    return jax.device_put(tree, tree_shardings(tree, mesh))


def abstract_sharded(tree: Any, mesh: Mesh) -> Any:
    """ShapeDtypeStructs of `tree` carrying their shardings on `mesh`: a target to restore into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree,
                        tree_shardings(tree, mesh))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves `model`'s variables onto `mesh` in place (parameters by `PARAM_AXES`) and returns it."""
    state = nnx.state(model)
    nnx.update(model, shard(state, mesh))
    return model


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split on `mesh`: the product of its batch axes' sizes."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return math.prod(sizes[a] for a in _mesh_axes(mesh, "batch"))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """The sharding of a [B, T, ...] batch of data: rows split over the batch axes."""
    return NamedSharding(mesh, PartitionSpec(_mesh_axes(mesh, "batch") or None, *(None,) * (ndim - 1)))


def context_shards(mesh=None) -> int:
    """How many ways the sequence is split: the size of `mesh`'s "context" axis (default: that of
    the context mesh set with `jax.set_mesh`; 1 without one)."""
    mesh = _context_mesh() if mesh is None else mesh
    if mesh is None:
        return 1
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(CONTEXT_AXIS, 1)


def _context_mesh():
    """The context mesh (jax.set_mesh) if its axes are not all manual, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.are_all_axes_manual:
        return None
    return mesh


def _auto_axes(mesh) -> frozenset[str]:
    return frozenset(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Auto)


def _dividing(mesh, axes: tuple[str, ...], dim: int) -> tuple[str, ...]:
    """The longest prefix of `axes` whose sizes multiply to a divisor of `dim`."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    for n in range(len(axes), 0, -1):
        if dim % math.prod(sizes[a] for a in axes[:n]) == 0:
            return axes[:n]
    return ()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the sharding of its logical axes on the context mesh (a no-op without
    one). A dim that does not divide over its mesh axes is left to XLA (e.g. one decoded row)."""
    mesh = _context_mesh()
    if mesh is None:
        return x
    usable = _auto_axes(mesh)
    entries = []
    for name, dim in zip(logical, x.shape):
        axes = _dividing(mesh, _mesh_axes(mesh, name, usable), dim)
        entries.append(axes or None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*entries))


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _known_sharding(x) -> tuple[Any, PartitionSpec] | None:
    """(mesh, spec) of an array whose sharding is known where it is used: a concrete array with a
    NamedSharding, or a traced one whose type names explicit mesh axes; else None."""
    if isinstance(x, jax.core.Tracer):
        sharding = getattr(jax.typeof(x), "sharding", None)
        if sharding is None or sharding.mesh.empty:
            return None
        explicit = {a for a, t in zip(sharding.mesh.axis_names, sharding.mesh.axis_types) if t == AxisType.Explicit}
        if not any(set(_spec_axes(e)) & explicit for e in sharding.spec):
            return None
        return sharding.mesh, sharding.spec
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and not sharding.is_fully_replicated:
        return sharding.mesh, sharding.spec
    return None


def attention_partition(q: jax.Array, k: jax.Array) -> AttentionSharding | None:
    """How to run an attention kernel per shard for q [B, T, H, D] and k [B, S, K, D], or None
    to run it whole.

    Inputs whose sharding is known (concrete arrays, explicit-axis types) are split as they are
    on their batch and head axes. Otherwise, under a context mesh, batch rows are split over the
    "data"/"fsdp" axes and heads over "model", as far as B and K divide; with neither, None.
    """
    B, _, H, _ = q.shape
    K = k.shape[2]
    known = _known_sharding(q)
    if known is not None:
        mesh, spec = known
        spec = tuple(spec) + (None,) * (4 - len(spec))
        partition = AttentionSharding(mesh, _spec_axes(spec[0]), _spec_axes(spec[2]))
    else:
        mesh = _context_mesh()
        if mesh is None:
            return None
        usable = _auto_axes(mesh)
        partition = AttentionSharding(mesh, _dividing(mesh, _mesh_axes(mesh, "batch", usable), B),
                                      _dividing(mesh, _mesh_axes(mesh, "heads", usable), math.gcd(H, K)))
    if partition.trivial:
        return None
    partition.check(B, H, K)
    return partition


def ring_partition(q: jax.Array, k: jax.Array) -> AttentionSharding | None:
    """How to run ring attention for q [B, T, H, D] and k [B, S, K, D] under the context mesh: the
    sequence split over its "context" axis, batch rows and heads as `attention_partition` splits
    them; None without a context axis of more than one device.

    Raises:
      ValueError: shards that would not hold whole batch rows and KV-head groups.
    """
    mesh = _context_mesh()
    if mesh is None or context_shards(mesh) == 1 or CONTEXT_AXIS not in _auto_axes(mesh):
        return None
    usable = _auto_axes(mesh)
    B, _, H, _ = q.shape
    K = k.shape[2]
    partition = AttentionSharding(mesh, _dividing(mesh, _mesh_axes(mesh, "batch", usable), B),
                                  _dividing(mesh, _mesh_axes(mesh, "heads", usable), math.gcd(H, K)),
                                  sequence_axes=(CONTEXT_AXIS,))
    partition.check(B, H, K)
    return partition
