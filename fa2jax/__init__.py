"""fa2jax: FlashAttention-2 attention layers and a Llama-style model for JAX / Flax NNX."""

# The package version, read by pyproject.toml (tool.setuptools.dynamic); CHANGELOG.md says what changed.
__version__ = "0.2.0.dev0"

from fa2jax._deprecation import renamed_attributes
from fa2jax.attention import decode_attention, dot_product_attention, tree_attention
from fa2jax.checking import checked
from fa2jax.config import RopeScalingConfig, TransformerConfig
from fa2jax.fusion import fuse_projections, unfuse_projections
from fa2jax.hf_export import save_pretrained
from fa2jax.hf_llama import load_hf_llama
from fa2jax.kv_cache import KVCache
from fa2jax.layers import MultiHeadAttention, attention_fn
from fa2jax.loading import load_pretrained, load_tokenizer
from fa2jax.model import Transformer

__all__ = [
    # attention functions
    "dot_product_attention",
    "tree_attention",
    "decode_attention",
    "attention_fn",
    # layers and model
    "MultiHeadAttention",
    "Transformer",
    "TransformerConfig",
    "RopeScalingConfig",
    "KVCache",
    "fuse_projections",
    "unfuse_projections",
    "checked",
    # loading
    "load_pretrained",
    "load_tokenizer",
    "load_hf_llama",
    "save_pretrained",
]

# Renamed public names, still served with a DeprecationWarning.
__getattr__ = renamed_attributes(__name__, {"RopeScaling": ("RopeScalingConfig", RopeScalingConfig)})
