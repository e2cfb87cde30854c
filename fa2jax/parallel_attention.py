"""The Pallas attention kernels inside sharded programs: one kernel call per shard of rows and heads.

`fa2jax.attention` calls these in place of the kernels themselves. When the operands are sharded
(concrete arrays with a NamedSharding, explicit-axis types, or a context mesh set with
`jax.set_mesh`), `fa2jax.sharding.attention_partition` says how B and H/K are split and the
kernel runs under `jax.shard_map` on each device's rows and KV-head groups: no operand is
gathered (see `pallas_kernels.common.sharded`). Without a mesh they are the kernels, unchanged.
"""

from __future__ import annotations

import functools

import numpy as np

from fa2jax import sharding
from pallas_kernels import decode_attention as decode_kernel
from pallas_kernels import flash_attention as flash_kernel
from pallas_kernels import tree_attention as tree_kernel
from pallas_kernels.common.sharded import shard_attention


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
