"""`load_hf_llama`: the Hugging Face-only entry point, kept by name; it loads every mapped family.

The loader lives in `fa2jax.hf` and the families in `fa2jax.hf_families`; `fa2jax.load_pretrained`
is the entry point for every format.
"""

from __future__ import annotations

from fa2jax.hf import load_hf
from fa2jax.hf_families import config_from_hf

load_hf_llama = load_hf

__all__ = ["config_from_hf", "load_hf_llama"]
