"""`fuse_projections`: a `Transformer` rewritten with one matmul for Q/K/V and one for the MLP's gate/up.

At a small batch a decoding step of a small model is bound by how many kernels it launches, not
by the bytes of its weights (they stream in a small fraction of the step's time on a GPU): each
block's query, key and value projections read the same normalised input, and so do the MLP's
gate and up projections, so one wider matmul does the work of three and of two. The fused model
computes the same function: every output column is the same dot product over the same inputs,
only grouped into fewer kernels (a GPU may pick another matmul algorithm for the wider shape, so
bf16 results may differ in the last bit).

The fused layout (`TransformerConfig.fused_projections`) is for inference: loaders, checkpoints,
Hugging Face export, training and the sharding rules use the separate projections. Convert once,
after loading: `model = fuse_projections(load_pretrained(path))`; `unfuse_projections` goes back.
The generate functions of `spec` fuse their models themselves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fa2jax.config import TransformerConfig
from fa2jax.model import Transformer

# Block submodule -> its projections in either layout (the separate ones, then the fused one).
_PROJECTIONS = {"attn": ("query", "key", "value", "qkv"), "mlp": ("gate", "up", "gate_up")}

def fuse_projections(model: Transformer) -> Transformer:
    """`model` with fused projections: each block's attn.qkv [d_model, H + 2K, D] and mlp.gate_up
    [d_model, 2 * d_ff] replace attn.{query, key, value} and mlp.{gate, up} (biases likewise).

    Other parameters are the same arrays; a model already fused is returned as it is.
    """
    return _convert(model, fused=True)


def unfuse_projections(model: Transformer) -> Transformer:
    """The inverse of `fuse_projections`: separate query/key/value and gate/up projections again
    (the layout of checkpoints and training); a model not fused is returned as it is."""
    return _convert(model, fused=False)


def _convert(model: Transformer, *, fused: bool) -> Transformer:
    if not isinstance(model, Transformer):
        raise TypeError(f"expected a fa2jax Transformer, got {type(model)=}")
    config = model.config
    if config.fused_projections == fused:
        return model
    graphdef, abstract = _template(config.replace(fused_projections=fused))
    pure = nnx.to_pure_dict(nnx.state(model))
    layers = [pure["layers"][i] for i in range(config.num_layers)]
    # Only the projections go through the jitted conversion: every other array is kept, not copied.
    projections = [{part: {name: layer[part][name] for name in names if name in layer[part]}
                    for part, names in _PROJECTIONS.items()} for layer in layers]
    if fused:
        converted = _fuse_layers(projections)
    else:
        converted = _unfuse_layers(projections, heads=config.num_heads, kv_heads=config.num_kv_heads, d_ff=config.d_ff)
    for layer, new in zip(layers, converted):
        for part, names in _PROJECTIONS.items():
            layer[part] = {k: v for k, v in layer[part].items() if k not in names} | new[part]
    state = jax.tree.map(lambda x: x, abstract)  # fresh containers: the cached template stays as it is
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


@functools.cache
def _template(config: TransformerConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and abstract state of a `config` model, remembered per config: building a model
    under `nnx.eval_shape` takes seconds of Python for a 30-layer model, and every SpeculativeDecoder
    and every trace of generate_incremental converts its models."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))


@jax.jit
def _fuse_layers(layers: list[dict]) -> list[dict]:
    """Per layer {"attn": {query, key, value}, "mlp": {gate, up}} -> {"attn": {qkv}, "mlp": {gate_up}}.

    Kernels: query [F, H, D], key/value [F, K, D] -> qkv [F, H + 2K, D] (head axis, query heads
    first); gate/up [d_model, d_ff] -> gate_up [d_model, 2 d_ff]. Biases concatenate the same way.
    """
    fused = []
    for layer in layers:
        attn, mlp = layer["attn"], layer["mlp"]
        fused.append({
            "attn": {"qkv": {name: jnp.concatenate([attn[p][name] for p in ("query", "key", "value")], axis=-2)
                             for name in attn["query"]}},
            "mlp": {"gate_up": {name: jnp.concatenate([mlp["gate"][name], mlp["up"][name]], axis=-1)
                                for name in mlp["gate"]}},
        })
    return fused


@functools.partial(jax.jit, static_argnames=("heads", "kv_heads", "d_ff"))
def _unfuse_layers(layers: list[dict], *, heads: int, kv_heads: int, d_ff: int) -> list[dict]:
    """The inverse of `_fuse_layers`."""
    split = []
    for layer in layers:
        qkv, gate_up = layer["attn"]["qkv"], layer["mlp"]["gate_up"]
        attn = {"query": {}, "key": {}, "value": {}}
        for name, x in qkv.items():  # kernel [F, H + 2K, D], bias [H + 2K, D]
            attn["query"][name] = x[..., :heads, :]
            attn["key"][name] = x[..., heads:heads + kv_heads, :]
            attn["value"][name] = x[..., heads + kv_heads:, :]
        mlp = {"gate": {name: x[..., :d_ff] for name, x in gate_up.items()},
               "up": {name: x[..., d_ff:] for name, x in gate_up.items()}}
        split.append({"attn": attn, "mlp": mlp})
    return split
