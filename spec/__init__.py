"""SpecInfer-style tree speculative decoding for `fa2jax.Transformer` models.

Trees (`ExpansionTree`, `MergedTree`, `DynamicTree`), drafts (the `Drafter` protocol; a
`Transformer` draft is a `ModelDrafter`, an EAGLE-style feature head a `FeatureDrafter`),
lossless greedy and stochastic verification, and `SpeculativeDecoder`, whose `generate` is one
jit-compiled loop; `generate_incremental` is the target-only baseline with the same result type.
"""
from spec.decoder import DecodeState, SpeculativeDecoder
from spec.drafters import Drafter, ModelDrafter
from spec.feature_draft import FeatureDrafter
from spec.generation import GenerationResult, GenerationStats
from spec.incremental import generate_incremental
from spec.sampling import warp_probs
from spec.trees import DynamicTree, ExpansionTree, MergedTree, TokenTree, TreeTopology
from spec.verify import VerifyResult, verify_greedy, verify_stochastic

__all__ = [
    "SpeculativeDecoder",
    "DecodeState",
    "Drafter",
    "ModelDrafter",
    "FeatureDrafter",
    "generate_incremental",
    "GenerationResult",
    "GenerationStats",
    "ExpansionTree",
    "MergedTree",
    "DynamicTree",
    "TreeTopology",
    "TokenTree",
    "VerifyResult",
    "verify_greedy",
    "verify_stochastic",
    "warp_probs",
]
