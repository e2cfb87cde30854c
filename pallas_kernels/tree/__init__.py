"""Tree attention (SpecInfer verification) and decode attention as one fused Pallas kernel."""

from pallas_kernels.tree.api import checked_tree_attention, decode_attention, tree_attention
from pallas_kernels.tree.arguments import check_inputs
from pallas_kernels.tree.reference import tree_attention_reference
from pallas_kernels.tree.tuning import TreeAttentionConfig

__all__ = [
    "TreeAttentionConfig",
    "check_inputs",
    "checked_tree_attention",
    "decode_attention",
    "tree_attention",
    "tree_attention_reference",
]
