"""`load_hf_llama`: a Hugging Face Llama checkpoint directory -> (TransformerConfig, Transformer).

Reads `config.json` and the `*.safetensors` shards with the `safetensors` package (no torch). The
architectures mapped: `LlamaForCausalLM` with SiLU MLPs, no attention/MLP biases, any GQA ratio, tied
or untied embeddings, RoPE without scaling or with "linear" / "llama3" scaling; anything else raises
a ValueError naming the setting. Hugging Face's RoPE rotates feature i with i + D/2, as ours does, so
projection weights load without permutation; torch's Linear stores [out, in], so kernels are transposed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from fa2jax.config import RopeScalingConfig, TransformerConfig
from fa2jax.model import Transformer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
# Buffers some exporters save that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _rope_settings(hf: dict) -> tuple[float, RopeScalingConfig | None]:
    """RoPE theta and scaling from either config layout (transformers < 5: rope_theta + rope_scaling;
    transformers >= 5: rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    settings = {**scaling, **params}
    kind = settings.get("rope_type", settings.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, RopeScalingConfig("linear", float(settings["factor"]))
    if kind == "llama3":
        return theta, RopeScalingConfig(
            "llama3", float(settings["factor"]), low_freq_factor=float(settings["low_freq_factor"]),
            high_freq_factor=float(settings["high_freq_factor"]),
            original_max_len=int(settings["original_max_position_embeddings"]))
    raise ValueError(f"unsupported RoPE scaling type {kind=}: only default, 'linear' and 'llama3' are mapped")


def config_from_hf(hf: dict, *, dtype=None, param_dtype=None, attention_impl: str | None = None) -> TransformerConfig:
    """Maps a Llama `config.json` dict to a TransformerConfig, rejecting what the model cannot express.

    Args:
        hf: the parsed config.json.
        dtype: compute dtype; default the parameter dtype.
        param_dtype: parameter dtype; default the checkpoint's (`torch_dtype` / `dtype`), else float32.
        attention_impl: as `TransformerConfig.attention_impl`.
    """
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or architectures != ["LlamaForCausalLM"]:
        raise ValueError(f"only Llama causal LMs are supported, got {model_type=} {architectures=}")
    hidden_act = hf.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"the MLP is SwiGLU (SiLU gate), got {hidden_act=}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            raise ValueError(f"biases are not supported, got {flag}={hf[flag]!r}")
    if hf.get("pretraining_tp", 1) != 1:
        logger.info("ignoring pretraining_tp=%s: it only changes how torch splits matmuls", hf["pretraining_tp"])
    if param_dtype is None:
        name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        if name not in _DTYPES:
            raise ValueError(f"unsupported checkpoint dtype {name=}, expected one of {tuple(_DTYPES)}")
        param_dtype = _DTYPES[name]
    theta, scaling = _rope_settings(hf)
    num_heads = int(hf["num_attention_heads"])
    return TransformerConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        d_ff=int(hf["intermediate_size"]),
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype or param_dtype,
        param_dtype=param_dtype,
        attention_impl=attention_impl,
        rope_scaling=scaling,
    )


def _read_tensors(directory: Path) -> dict[str, jax.Array]:
    """Every tensor of every shard, by Hugging Face name."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"no *.safetensors files in {str(directory)=}")
    tensors = {}
    for shard in shards:
        # framework="flax" reads bfloat16 too, which numpy cannot represent.
        with safe_open(directory / shard, framework="flax") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _our_params(config: TransformerConfig, hf: dict[str, jax.Array]) -> dict[tuple, jax.Array]:
    """Maps Hugging Face tensors to our flat parameter paths, transposed and reshaped to our layouts."""
    H, K, D, d = config.num_heads, config.num_kv_heads, config.head_dim, config.d_model
    hf = {name.removeprefix("model."): x for name, x in hf.items() if not name.endswith(_IGNORED_SUFFIXES)}
    used = set()

    def take(name):
        if name not in hf:
            raise ValueError(f"the checkpoint lacks a tensor the config needs: {name=}")
        used.add(name)
        return hf[name]

    params = {("embed", "embedding"): take("embed_tokens.weight"), ("final_norm", "scale"): take("norm.weight")}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        ours = ("layers", i)
        params[ours + ("attn_norm", "scale")] = take(p + "input_layernorm.weight")
        params[ours + ("mlp_norm", "scale")] = take(p + "post_attention_layernorm.weight")
        params[ours + ("attn", "query", "kernel")] = take(p + "self_attn.q_proj.weight").T.reshape(d, H, D)
        params[ours + ("attn", "key", "kernel")] = take(p + "self_attn.k_proj.weight").T.reshape(d, K, D)
        params[ours + ("attn", "value", "kernel")] = take(p + "self_attn.v_proj.weight").T.reshape(d, K, D)
        params[ours + ("attn", "out", "kernel")] = take(p + "self_attn.o_proj.weight").T.reshape(H, D, d)
        for name in ("gate", "up", "down"):
            params[ours + ("mlp", name, "kernel")] = take(p + f"mlp.{name}_proj.weight").T
    if config.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some exporters save the tied matrix twice
    else:
        params[("lm_head", "kernel")] = take("lm_head.weight").T
    unused = sorted(set(hf) - used)
    if unused:
        raise ValueError(f"the checkpoint has tensors this architecture does not use: {unused[:5]=}")
    return params


def load_hf_llama(directory: str | os.PathLike, *, dtype=None, param_dtype=None,
                  attention_impl: str | None = None) -> tuple[TransformerConfig, Transformer]:
    """Loads a Hugging Face Llama checkpoint (config.json + safetensors shards).

    Args:
        directory: a `save_pretrained` directory (or a downloaded hub snapshot).
        dtype: compute dtype; default the parameter dtype.
        param_dtype: parameter dtype; default the checkpoint's.
        attention_impl: "pallas" | "xla" | "cudnn" | None, see `TransformerConfig`.

    Returns:
        (config, model) with every parameter taken from the checkpoint.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ValueError(f"no config.json in {str(directory)=}")
    config = config_from_hf(json.loads(config_path.read_text()), dtype=dtype, param_dtype=param_dtype,
                            attention_impl=attention_impl)
    params = _our_params(config, _read_tensors(directory))

    # Build the module abstractly (no random init of a possibly large model), then fill in its leaves.
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    filled = []
    for path, variable in nnx.to_flat_state(state):
        value = params.pop(path, None)
        if value is None:
            raise ValueError(f"no checkpoint tensor maps to parameter {path=}")
        if value.shape != variable.shape:
            raise ValueError(f"shape mismatch for {path=}: checkpoint {value.shape=}, model {variable.shape=}")
        filled.append((path, nnx.Param(jnp.asarray(value, config.param_dtype))))
    if params:
        raise ValueError(f"mapped tensors with no parameter: {sorted(params)[:5]=}")
    return config, nnx.merge(graphdef, nnx.from_flat_state(filled), rest)
