"""Conditionals, sorts and while loops in the lowered (StableHLO) program of each decoding loop.

SmolLM2-135M's widths and vocabulary with 2 layers (the counts do not depend on depth), a random
feature head, batch 1. On a GPU each conditional, and each iteration of a while loop, waits for a
predicate copied to the host. Run from a checkout (PYTHONPATH=<checkout>) to count its code:

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/results/session21_cpu/lowered_counts.py

On the CPU, jax lowers the PRNG's threefry rounds as a rolled loop (one more while per random
draw), which a GPU lowering unrolls.
"""
import json
import re

import jax
import jax.numpy as jnp
from flax import nnx

from fa2jax import Transformer, TransformerConfig
from fa2jax.feature_head import FeatureHead, FeatureHeadConfig
from spec import DynamicTree, SpeculativeDecoder, incremental
from spec.feature_draft import FeatureDrafter
from spec.generation import EOS_SLOTS

TREES = {"dynamic32": DynamicTree(32, 7, 6), "dynamic128": DynamicTree(128, 6, 12)}


def warp_of(temperature: float) -> dict:
    return dict(temperature=jnp.float32(temperature), top_p=jnp.float32(0.95 if temperature > 0 else 1.0),
                top_k=jnp.int32(0), min_p=jnp.float32(0.0))


def count(text: str) -> dict:
    return dict(conditionals=len(re.findall(r"stablehlo\.(case|if)\b", text)),
                sorts=len(re.findall(r"stablehlo\.sort\b", text)),
                whiles=len(re.findall(r"stablehlo\.while\b", text)))


def main() -> None:
    config = TransformerConfig(vocab_size=49152, d_model=576, num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64,
                               d_ff=1536, tie_embeddings=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                               max_len=1024)
    target = Transformer(config, rngs=nnx.Rngs(0))
    drafter = FeatureDrafter(FeatureHead(FeatureHeadConfig.for_target(config), rngs=nnx.Rngs(1)), target)
    prompt, lengths = jnp.ones((1, 16), jnp.int32), jnp.array([16], jnp.int32)
    no_eos, limit = jnp.full((EOS_SLOTS,), -1, jnp.int32), jnp.int32(10)
    graphdef, params = nnx.split(target)
    out = {}
    for mode, temperature in (("greedy", 0.0), ("t1.0", 1.0)):
        warp = warp_of(temperature)
        state = incremental._init_jit(graphdef, params, prompt, lengths, jax.random.key(0), no_eos, warp,
                                      max_new_tokens=16, fused=True)
        # Before this session's change the incremental loop had no `sampling` switch.
        static = {"sampling": temperature > 0} if "sampling" in incremental._run.__code__.co_varnames else {}
        lowered = incremental._run_jit.lower(graphdef, params, state, no_eos, warp, limit, fused=True, **static)
        out[f"incremental/{mode}"] = count(lowered.as_text())
        for name, tree in TREES.items():
            decoder = SpeculativeDecoder(target, drafter, tree=tree,
                                         verify="greedy" if temperature == 0 else "stochastic")
            tp, dp = decoder._target_params, decoder._draft_params
            scalars = (warp["temperature"], warp["top_p"])
            state = decoder._init_jit(tp, dp, prompt, lengths, *scalars, jax.random.key(0), no_eos, max_new_tokens=16,
                                      top_k=warp["top_k"], min_p=warp["min_p"])
            lowered = decoder._run_jit.lower(tp, dp, state, *scalars, no_eos, limit, warp["top_k"], warp["min_p"])
            out[f"{name}/{mode}"] = count(lowered.as_text())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
