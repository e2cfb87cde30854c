"""Pallas kernels: FlashAttention-2 forward/backward, tree attention and decode attention."""

from pallas_kernels.flash_attention.reference import attention_reference
from pallas_kernels.tree_attention.reference import tree_attention_reference

__all__ = ["attention_reference", "tree_attention_reference"]
