"""Pallas kernels: FlashAttention-2 forward/backward, tree attention and decode attention.

The public functions live here; the families live in `fa2/` (flash_attention,
flash_attention_varlen) and `tree/` (tree_attention, decode_attention), both built on `common/`.
"""

from pallas_kernels.fa2.api import flash_attention
from pallas_kernels.fa2.block_sizes import BlockSizes
from pallas_kernels.fa2.reference import attention_reference
from pallas_kernels.fa2.tuning import autotune
from pallas_kernels.fa2.varlen import flash_attention_varlen
from pallas_kernels.tree.api import checked_tree_attention, decode_attention, tree_attention
from pallas_kernels.tree.reference import tree_attention_reference

__all__ = [
    "BlockSizes",
    "attention_reference",
    "autotune",
    "checked_tree_attention",
    "decode_attention",
    "flash_attention",
    "flash_attention_varlen",
    "tree_attention",
    "tree_attention_reference",
]
