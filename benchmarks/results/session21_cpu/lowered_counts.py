"""Conditionals, sorts and while loops in the lowered (StableHLO) program of each decoding loop.

SmolLM2-135M's widths and vocabulary with 2 layers (the counts do not depend on depth), a random
feature head, batch 1. On a GPU each conditional, and each iteration of a while loop, waits for a
predicate copied to the host. Run from a checkout (PYTHONPATH=<checkout>) to count its code:

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/results/session21_cpu/lowered_counts.py

On the CPU, jax lowers the PRNG's threefry rounds as a rolled loop (one more while per random
draw), which a GPU lowering unrolls.
"""
import sys, json, re
import jax, jax.numpy as jnp
from flax import nnx
from fa2jax import Transformer
from fa2jax.feature_head import FeatureHead, FeatureHeadConfig
from spec import DynamicTree, SpeculativeDecoder, incremental
from spec.feature_draft import FeatureDrafter
from spec.generation import EOS_SLOTS
def warp_of(t):
    return dict(temperature=jnp.float32(t), top_p=jnp.float32(0.95 if t > 0 else 1.0), top_k=jnp.int32(0), min_p=jnp.float32(0.0))
from fa2jax import TransformerConfig
config = TransformerConfig(vocab_size=49152, d_model=576, num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64,
                           d_ff=1536, tie_embeddings=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, max_len=1024)
target = Transformer(config, rngs=nnx.Rngs(0))
drafter = FeatureDrafter(FeatureHead(FeatureHeadConfig.for_target(config), rngs=nnx.Rngs(1)), target)
prompt = jnp.ones((1, 16), jnp.int32); lengths = jnp.array([16], jnp.int32)
no_eos = jnp.full((EOS_SLOTS,), -1, jnp.int32)
def count(text):
    return dict(conditionals=len(re.findall(r"stablehlo\.(case|if)\b", text)), sorts=len(re.findall(r"stablehlo\.sort\b", text)),
                whiles=len(re.findall(r"stablehlo\.while\b", text)))
out = {}
for mode, t in (("greedy", 0.0), ("t1.0", 1.0)):
    warp = warp_of(t)
    graphdef, params = nnx.split(target)
    state = incremental._init_jit(graphdef, params, prompt, lengths, jax.random.key(0), no_eos, warp, max_new_tokens=16, fused=True)
    kw = {"sampling": t > 0} if "sampling" in incremental._run.__code__.co_varnames else {}
    out[f"incremental/{mode}"] = count(incremental._run_jit.lower(graphdef, params, state, no_eos, warp, jnp.int32(10), fused=True, **kw).as_text())
    for name, tree in (("dynamic32", DynamicTree(32, 7, 6)), ("dynamic128", DynamicTree(128, 6, 12))):
        dec = SpeculativeDecoder(target, drafter, tree=tree, verify="greedy" if t == 0 else "stochastic")
        tp, dp = dec._target_params, dec._draft_params
        st = dec._init_jit(tp, dp, prompt, lengths, warp["temperature"], warp["top_p"], jax.random.key(0), no_eos,
                           max_new_tokens=16, top_k=warp["top_k"], min_p=warp["min_p"])
        out[f"{name}/{mode}"] = count(dec._run_jit.lower(tp, dp, st, warp["temperature"], warp["top_p"], no_eos, jnp.int32(10), warp["top_k"], warp["min_p"]).as_text())
print(json.dumps(out))
