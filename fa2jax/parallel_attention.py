"""The Pallas attention kernels inside sharded programs: one kernel call per shard of rows and heads.

`fa2jax.attention` calls these in place of the kernels themselves. When the operands are sharded
(concrete arrays with a NamedSharding, explicit-axis types, or a context mesh set with
`jax.set_mesh`), `fa2jax.sharding.attention_partition` says how B and H/K are split and the
kernel runs under `jax.shard_map` on each device's rows and KV-head groups: no operand is
gathered (see `pallas_kernels.common.sharded`). Without a mesh they are the kernels, unchanged.

`ring_self_attention` is context parallelism's attention: the sequence split over the mesh's
"context" axis as well, in zig-zag order, and the kernel run per block pair as the K/V chunks
travel around the ring (`pallas_kernels.fa2.ring`).
"""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np

from fa2jax import sharding
from pallas_kernels import decode_attention as decode_kernel
from pallas_kernels import flash_attention as flash_kernel
from pallas_kernels import tree_attention as tree_kernel
from pallas_kernels.common.sharded import shard_attention
from pallas_kernels.fa2 import ring

logger = logging.getLogger(__name__)


def flash_attention(q, k, v, *, segment_ids=None, mask=None, dropout_rate: float = 0.0, dropout_seed=None,
                    **static):
    """`pallas_kernels.flash_attention(q, k, v, ...)`, per shard when the operands are sharded.

    Args:
      q [B, T, H, D]; k, v [B, S, K, D]; segment_ids None or (q_ids [B, T], kv_ids [B, S]);
      mask None or bool [B|1, H|1, T, S]; `static`: the kernel's other keyword arguments.

    Raises:
      ValueError: dropout in a sharded call (the dropout hash numbers rows and heads within the
        call, so shards would not drop the pairs the whole call drops), or shards that would not
        hold whole KV-head groups.
    """
    partition = sharding.attention_partition(q, k)
    if partition is None:
        return flash_kernel(q, k, v, segment_ids=segment_ids, mask=mask, dropout_rate=dropout_rate,
                            dropout_seed=dropout_seed, **static)
    if dropout_rate > 0:
        raise ValueError(f"attention dropout is not supported in a sharded call ({dropout_rate=} with "
                         f"batch over {partition.batch_axes}, heads over {partition.head_axes})")
    q_ids, kv_ids = segment_ids if segment_ids is not None else (None, None)
    # A mask broadcast over batch or heads ([1, ...] there) is given whole to every shard.
    mask_layout = None
    if mask is not None:
        mask_layout = ("B" if mask.shape[0] > 1 else "1") + ("H" if mask.shape[1] > 1 else "1") + "TS"

    def kernel(q, k, v, q_ids, kv_ids, mask):
        ids = None if q_ids is None else (q_ids, kv_ids)
        return flash_kernel(q, k, v, segment_ids=ids, mask=mask, **static)

    out_layouts = ("BTHD", "BHT") if static.get("return_lse") else "BTHD"
    return shard_attention(kernel, partition, [(q, "BTHD"), (k, "BSKD"), (v, "BSKD"), (q_ids, "BT"),
                                               (kv_ids, "BS"), (mask, mask_layout)], out_layouts)


@functools.cache
def _log_ring_choice(implementation) -> None:
    logger.info("fa2jax attention: a context axis runs ring attention with the Pallas kernels "
                "(implementation=%r asked for none in particular)", implementation)


def ring_self_attention(q, k, v, *, is_causal: bool, segment_ids=None, scale: float | None = None,
                        softcap: float = 0.0, window_size=(-1, -1), mask=None, dropout_rate: float = 0.0,
                        implementation: str | None = None):
    """Self-attention of a sequence laid out in zig-zag order (`pallas_kernels.fa2.ring.zigzag`)
    and split over the "context" axis of the context mesh: ring attention, our kernel per block
    pair, with batch rows and heads split as `flash_attention` splits them.

    Args:
      q [B, T, H, D]; k, v [B, T, K, D], in zig-zag order for the context axis's n devices
        (T % 2n == 0); segment_ids None, [B, T], or a (q_ids, kv_ids) pair of [B, T], in that order.
      is_causal, scale, softcap: as in `fa2jax.dot_product_attention`.
      window_size, mask, dropout_rate, implementation: accepted so that a layer can pass its own
        settings; anything ring attention cannot honour raises.

    Returns:
      [B, T, H, D] in q's dtype, in the same order and split as q.

    Raises:
      ValueError: no context axis of more than one device in the context mesh; T != S or T not
        a multiple of 2n; a window, a mask, dropout, or an implementation other than "pallas"
        (the ring's blocks need the kernel's logsumexp: XLA and cuDNN give none).
    """
    partition = sharding.ring_partition(q, k)
    if partition is None:
        raise ValueError(f"ring attention needs a context mesh (jax.set_mesh) with a {sharding.CONTEXT_AXIS!r} "
                         f"axis of more than one device, got {jax.sharding.get_abstract_mesh()=}")
    n = partition.sequence_shards
    T, S = q.shape[1], k.shape[1]
    if T != S or T % (2 * n):
        raise ValueError(f"ring attention over {n} devices needs self-attention with T a multiple of 2 * {n} "
                         f"(two zig-zag pieces per device), got {q.shape=} {k.shape=}")
    if tuple(window_size) != (-1, -1) or mask is not None or dropout_rate > 0:
        raise ValueError(f"ring attention takes no window, mask or dropout (each block would need the global "
                         f"positions of its pair), got {window_size=} mask={None if mask is None else mask.shape} "
                         f"{dropout_rate=}")
    if implementation not in (None, "pallas"):
        raise ValueError(f"a context axis runs ring attention with the Pallas kernels; {implementation=} cannot "
                         f"run it (use 'pallas' or None)")
    if implementation is None:
        _log_ring_choice(implementation)
    if segment_ids is None:
        q_ids = kv_ids = None
    elif isinstance(segment_ids, (tuple, list)):
        q_ids, kv_ids = segment_ids
    else:
        q_ids = kv_ids = segment_ids
    kernel_args = dict(sm_scale=scale, softcap=softcap)

    def kernel(q, k, v, q_ids, kv_ids):
        ids = None if q_ids is None else (q_ids, kv_ids)
        return ring.ring_attention(q, k, v, axis_name=sharding.CONTEXT_AXIS, causal=is_causal, segment_ids=ids,
                                   **kernel_args)

    return shard_attention(kernel, partition, [(q, "BTHD"), (k, "BSKD"), (v, "BSKD"), (q_ids, "BT"),
                                               (kv_ids, "BS")], "BTHD")


def tree_attention(q, k_cache, v_cache, lengths, tree_mask, **static):
    """`pallas_kernels.tree_attention`, per shard of rows and heads when the operands are sharded.

    q [B, N, H, D]; caches [B, S, K, D]; lengths [B]; tree_mask [N, N] (shared) or [B, N, N].
    """
    partition = sharding.attention_partition(q, k_cache)
    if partition is None:
        return tree_kernel(q, k_cache, v_cache, lengths, tree_mask, **static)
    if isinstance(tree_mask, np.ndarray):
        # A NumPy mask is checked at trace time as a tree closure: keep it a constant of the kernel.
        kernel = functools.partial(_tree_with_mask, tree_mask=tree_mask, static=static)
        return shard_attention(kernel, partition, [(q, "BNHD"), (k_cache, "BSKD"), (v_cache, "BSKD"),
                                                   (lengths, "B")], _tree_out(static))
    mask_layout = "NN" if tree_mask.ndim == 2 else "BNN"
    kernel = functools.partial(tree_kernel, **static)
    return shard_attention(kernel, partition, [(q, "BNHD"), (k_cache, "BSKD"), (v_cache, "BSKD"), (lengths, "B"),
                                               (tree_mask, mask_layout)], _tree_out(static))


def decode_attention(q, k_cache, v_cache, lengths, **static):
    """`pallas_kernels.decode_attention`, per shard of rows and heads when the operands are sharded."""
    partition = sharding.attention_partition(q, k_cache)
    if partition is None:
        return decode_kernel(q, k_cache, v_cache, lengths, **static)
    kernel = functools.partial(decode_kernel, **static)
    return shard_attention(kernel, partition, [(q, "BTHD"), (k_cache, "BSKD"), (v_cache, "BSKD"), (lengths, "B")],
                           _tree_out(static))


def _tree_with_mask(q, k_cache, v_cache, lengths, *, tree_mask, static):
    return tree_kernel(q, k_cache, v_cache, lengths, tree_mask, **static)


def _tree_out(static) -> str | tuple[str, str]:
    return ("BNHD", "BHN") if static.get("return_lse") else "BNHD"
