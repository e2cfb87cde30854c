"""Hugging Face model families: config.json -> `TransformerConfig` switches, tensor names -> ours.

One `HFFamily` per `model_type` in `HF_FAMILIES`. Each says which config.json keys it understands
(with transformers' defaults for the ones a config may leave out), how they set the switches of
our one decoder, and a table from checkpoint tensor names to our parameter paths. A key no family
entry knows, or a value we do not implement, is a ValueError naming it, so a checkpoint that
needs something this decoder lacks is refused instead of silently computed wrong.

Mapped (transformers 5 semantics, checked against its models in tests/test_families.py):
    llama        Llama 1-3.x: RoPE scaling linear / dynamic / yarn / llama3, optional biases
    mistral      sliding_window W on every layer (a token sees itself and W - 1 earlier tokens)
    qwen2        q/k/v biases (no output bias); sliding layers from max_window_layers / layer_types
    qwen3        per-head q/k RMSNorm before RoPE, explicit head_dim
    gemma2       (1 + w) RMSNorms, pre and post sublayer norms, sqrt(d_model) embedding scale,
                 GeGLU (tanh GELU), query_pre_attn_scalar, attention and final logit softcaps,
                 alternating sliding-window layers
    gemma3_text  Gemma 2's block with qk-norm, a sliding pattern (5 local : 1 global by default),
                 a separate RoPE base for local layers, global RoPE scaling
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from fa2jax.config import RopeScalingConfig, TransformerConfig

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}

# config.json keys that never change the forward pass: bookkeeping, token ids, training-only and
# cache-layout settings.
GENERIC_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "attention_dropout", "use_cache",
    "cache_implementation", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
    "return_dict",
})
# Keys every family reads: sizes, norm epsilon, RoPE.
COMMON_KEYS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters",
})

# Checkpoint tensor name -> our parameter path; "{i}" is the layer index. torch's Linear weights
# ([out, in]) land on our `kernel`s transposed, then every tensor is reshaped to our layout
# (heads split out of the projection axis); see `fa2jax.hf`.
LLAMA_TENSORS: Mapping[str, str] = {
    "model.embed_tokens.weight": "embed.embedding",
    "model.norm.weight": "final_norm.scale",
    "lm_head.weight": "lm_head.kernel",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.scale",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.scale",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.query.kernel",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.key.kernel",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.value.kernel",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.out.kernel",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.query.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.key.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.value.bias",
    "model.layers.{i}.self_attn.o_proj.bias": "layers.{i}.attn.out.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm.scale",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm.scale",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate.kernel",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up.kernel",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down.kernel",
    "model.layers.{i}.mlp.gate_proj.bias": "layers.{i}.mlp.gate.bias",
    "model.layers.{i}.mlp.up_proj.bias": "layers.{i}.mlp.up.bias",
    "model.layers.{i}.mlp.down_proj.bias": "layers.{i}.mlp.down.bias",
}
# Gemma 2/3 name their four norms differently: `post_attention_layernorm` is the attention
# output's post-norm there, while Llama uses the name for the norm before the MLP.
GEMMA_TENSORS: Mapping[str, str] = {
    **{k: v for k, v in LLAMA_TENSORS.items() if "post_attention_layernorm" not in k},
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.attn_post_norm.scale",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.mlp_norm.scale",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.mlp_post_norm.scale",
}
# Buffers some exporters save that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class HFFamily:
    """How one Hugging Face `model_type` maps onto `TransformerConfig` and our parameters.

    Attributes:
        architectures: the `architectures` entries accepted (the causal-LM class).
        keys: config.json keys this family reads or knows to be inert, beyond GENERIC_KEYS and COMMON_KEYS.
        defaults: transformers' class defaults for keys a config.json may omit.
        switches: (config.json with defaults filled in) -> TransformerConfig fields beyond the common ones.
        tensors: checkpoint tensor name -> our parameter path ("{i}" = layer index).
    """

    architectures: tuple[str, ...]
    keys: frozenset[str]
    defaults: Mapping[str, Any]
    switches: Callable[[dict], dict]
    tensors: Mapping[str, str]


def _expect(hf: dict, key: str, allowed: tuple) -> Any:
    value = hf.get(key)
    if value not in allowed:
        raise ValueError(f"unsupported config.json setting {key}={value!r}: supported values are {allowed}")
    return value


def _windows(hf: dict, *, default_types: list[str] | None = None) -> tuple[int, ...]:
    """Per-layer windows from `layer_types` (or the family's default pattern) and `sliding_window`."""
    layers = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or default_types or ["full_attention"] * layers
    if len(types) != layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"unsupported config.json setting layer_types={types!r}: need {layers} entries of "
                         f"'full_attention' / 'sliding_attention'")
    window = hf.get("sliding_window")
    if window is None or "sliding_attention" not in types:
        return ()
    window = int(window)
    if window < 1:
        raise ValueError(f"unsupported config.json setting sliding_window={window!r}: must be >= 1 or null")
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def _llama(hf: dict) -> dict:
    _expect(hf, "hidden_act", ("silu",))
    bias = bool(hf["attention_bias"])
    return dict(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf["mlp_bias"]))


def _mistral(hf: dict) -> dict:
    _expect(hf, "hidden_act", ("silu",))
    if "layer_types" in hf:  # transformers' Mistral ignores it (Ministral reads it): refuse to guess
        raise ValueError(f"unsupported config.json setting layer_types={hf['layer_types']!r} for model_type="
                         f"'mistral' (transformers' MistralForCausalLM ignores it)")
    window = hf["sliding_window"]
    layers = int(hf["num_hidden_layers"])
    return dict(layer_windows=_windows({**hf, "layer_types": ["sliding_attention"] * layers}) if window else ())


def _qwen_windows(hf: dict) -> tuple[int, ...]:
    # transformers drops the window unless use_sliding_window, and by default slides the layers
    # from max_window_layers on.
    hf = {**hf, "sliding_window": hf["sliding_window"] if hf["use_sliding_window"] else None}
    layers = int(hf["num_hidden_layers"])
    first = int(hf["max_window_layers"])
    return _windows(hf, default_types=["sliding_attention" if hf["sliding_window"] is not None and i >= first
                                       else "full_attention" for i in range(layers)])


def _qwen2(hf: dict) -> dict:
    _expect(hf, "hidden_act", ("silu",))
    _expect(hf, "use_mrope", (False, None))
    return dict(qkv_bias=True, layer_windows=_qwen_windows(hf))


def _qwen3(hf: dict) -> dict:
    _expect(hf, "hidden_act", ("silu",))
    bias = bool(hf["attention_bias"])
    return dict(qkv_bias=bias, out_bias=bias, qk_norm=True, layer_windows=_qwen_windows(hf))


def _gemma_common(hf: dict) -> dict:
    _expect(hf, "hidden_activation", ("gelu_pytorch_tanh",))
    _expect(hf, "use_bidirectional_attention", (False, None))
    bias = bool(hf["attention_bias"])
    return dict(qkv_bias=bias, out_bias=bias, norm_offset=1.0, mlp_activation="gelu_tanh", post_norms=True,
                scale_embeddings=True, attn_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
                logit_softcap=float(hf["final_logit_softcapping"] or 0.0))


def _gemma2(hf: dict) -> dict:
    layers = int(hf["num_hidden_layers"])
    pattern = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    return dict(_gemma_common(hf), attn_softcap=float(hf["attn_logit_softcapping"] or 0.0),
                layer_windows=_windows(hf, default_types=pattern))


def _gemma3(hf: dict) -> dict:
    if hf["attn_logit_softcapping"] is not None:  # transformers' Gemma 3 attention never applies it
        raise ValueError(f"unsupported config.json setting attn_logit_softcapping={hf['attn_logit_softcapping']!r} "
                         f"for model_type='gemma3_text' (transformers ignores it there)")
    layers = int(hf["num_hidden_layers"])
    every = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
    pattern = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
    return dict(_gemma_common(hf), qk_norm=True, layer_windows=_windows(hf, default_types=pattern))


_QWEN_KEYS = frozenset({"hidden_act", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})
_GEMMA_KEYS = frozenset({"hidden_activation", "attention_bias", "query_pre_attn_scalar", "sliding_window",
                         "layer_types", "final_logit_softcapping", "attn_logit_softcapping",
                         "use_bidirectional_attention",
                         "hidden_act"})  # older Gemma 2 configs repeat the activation here; transformers reads hidden_activation
_GEMMA_DEFAULTS = dict(head_dim=256, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                       attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096)

HF_FAMILIES: dict[str, HFFamily] = {
    "llama": HFFamily(
        architectures=("LlamaForCausalLM",),
        keys=frozenset({"hidden_act", "attention_bias", "mlp_bias", "pretraining_tp"}),
        defaults=dict(hidden_act="silu", attention_bias=False, mlp_bias=False, max_position_embeddings=2048),
        switches=_llama, tensors=LLAMA_TENSORS),
    "mistral": HFFamily(
        architectures=("MistralForCausalLM",),
        keys=frozenset({"hidden_act", "sliding_window", "layer_types"}),
        defaults=dict(hidden_act="silu", sliding_window=4096, max_position_embeddings=4096 * 32),
        switches=_mistral, tensors=LLAMA_TENSORS),
    "qwen2": HFFamily(
        architectures=("Qwen2ForCausalLM",),
        keys=_QWEN_KEYS | {"use_mrope"},
        defaults=dict(hidden_act="silu", use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                      max_position_embeddings=32768),
        switches=_qwen2, tensors=LLAMA_TENSORS),
    "qwen3": HFFamily(
        architectures=("Qwen3ForCausalLM",),
        keys=_QWEN_KEYS | {"attention_bias"},
        defaults=dict(hidden_act="silu", use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                      attention_bias=False, head_dim=128, max_position_embeddings=32768),
        switches=_qwen3, tensors=LLAMA_TENSORS),
    "gemma2": HFFamily(
        architectures=("Gemma2ForCausalLM",),
        keys=_GEMMA_KEYS | {"sliding_window_size"},  # a few early Gemma 2 configs; transformers ignores it
        defaults=dict(_GEMMA_DEFAULTS, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                      max_position_embeddings=8192),
        switches=_gemma2, tensors=GEMMA_TENSORS),
    "gemma3_text": HFFamily(
        architectures=("Gemma3ForCausalLM",),
        keys=_GEMMA_KEYS | {"rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"},
        defaults=dict(_GEMMA_DEFAULTS, final_logit_softcapping=None, attn_logit_softcapping=None,
                      max_position_embeddings=131072),
        switches=_gemma3, tensors=GEMMA_TENSORS),
}

# RoPE keys accepted per scaling type (transformers' validation lists), beyond rope_type / type / rope_theta.
_ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"}),
}


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_from_hf(params: dict, *, theta: float, max_len: int, where: str = "rope_parameters"
                 ) -> tuple[float, RopeScalingConfig | None]:
    """RoPE base and scaling from one rope dict (transformers 5's rope_parameters or 4's rope_scaling)."""
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in _ROPE_KEYS:
        raise ValueError(f"unsupported RoPE scaling type {kind=} in {where}: the types mapped are "
                         f"{tuple(_ROPE_KEYS)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"unsupported {where} setting partial_rotary_factor={params['partial_rotary_factor']!r}: "
                         f"RoPE covers the whole head")
    unknown = sorted(set(params) - _ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if unknown:
        raise ValueError(f"unsupported {where} keys {unknown} for RoPE type {kind!r}")
    theta = float(params.get("rope_theta") or theta)
    if kind == "default":
        return theta, None
    original = int(params.get("original_max_position_embeddings") or max_len)
    factor = params.get("factor")
    if kind == "yarn" and factor is None:  # transformers derives it from the two lengths
        factor = max_len / original
    if factor is None:
        raise ValueError(f"RoPE type {kind!r} in {where} needs a 'factor'")
    factor = float(factor)
    if kind == "linear":
        return theta, RopeScalingConfig("linear", factor)
    if kind == "dynamic":
        # The base grows past max_position_embeddings (transformers' reference length for "dynamic").
        return theta, RopeScalingConfig("dynamic", factor, original_max_len=max_len)
    if kind == "llama3":
        return theta, RopeScalingConfig(
            "llama3", factor, low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]), original_max_len=original)
    attention_factor = params.get("attention_factor")
    if attention_factor is None and params.get("mscale") and params.get("mscale_all_dim"):
        attention_factor = _yarn_mscale(factor, params["mscale"]) / _yarn_mscale(factor, params["mscale_all_dim"])
    return theta, RopeScalingConfig(
        "yarn", factor, original_max_len=original, beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1), truncate=bool(params.get("truncate", True)),
        attention_factor=None if attention_factor is None else float(attention_factor))


def _rope_settings(hf: dict, model_type: str) -> dict:
    """rope_theta, rope_scaling (and local_rope_theta for Gemma 3) from either config layout."""
    max_len = int(hf["max_position_embeddings"])
    # transformers prefers a legacy rope_scaling dict over rope_parameters, as here.
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if model_type != "gemma3_text":
        if set(params) & {"full_attention", "sliding_attention"}:
            raise ValueError(f"unsupported rope_parameters per layer type {sorted(params)} for {model_type=}")
        theta, scaling = rope_from_hf(params, theta=float(hf.get("rope_theta") or 10000.0), max_len=max_len)
        return dict(rope_theta=theta, rope_scaling=scaling)
    if set(params) <= {"full_attention", "sliding_attention"} and params:  # transformers 5, nested per layer type
        global_params, local_params = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:  # transformers 4: rope_theta / rope_scaling for global layers, rope_local_base_freq for local ones
        global_params, local_params = params, {"rope_theta": hf.get("rope_local_base_freq")}
    theta, scaling = rope_from_hf(global_params, theta=float(hf.get("rope_theta") or 1_000_000.0), max_len=max_len,
                                  where="rope_parameters['full_attention']")
    local_theta, local_scaling = rope_from_hf(local_params, theta=10_000.0, max_len=max_len,
                                              where="rope_parameters['sliding_attention']")
    if local_scaling is not None:
        raise ValueError(f"unsupported RoPE scaling {local_scaling.kind!r} on Gemma 3's sliding layers")
    return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta)


def config_from_hf(hf: dict, *, dtype=None, param_dtype=None, attention_impl: str | None = None) -> TransformerConfig:
    """Maps a Hugging Face `config.json` dict of any family in `HF_FAMILIES` to a TransformerConfig.

    Args:
        hf: the parsed config.json.
        dtype: compute dtype; default the parameter dtype.
        param_dtype: parameter dtype; default the checkpoint's (`torch_dtype` / `dtype`), else float32.
        attention_impl: as `TransformerConfig.attention_impl`.

    Raises:
        ValueError naming the key: an unknown model_type or architecture, a config.json key the
        family does not know, or a value (activation, RoPE type, ...) the decoder does not implement.
    """
    model_type = hf.get("model_type")
    if model_type not in HF_FAMILIES:
        raise ValueError(f"unsupported Hugging Face {model_type=}: the families mapped are {sorted(HF_FAMILIES)}")
    family = HF_FAMILIES[model_type]
    architectures = hf.get("architectures") or list(family.architectures)
    if any(a not in family.architectures for a in architectures):
        raise ValueError(f"unsupported {architectures=} for {model_type=}: only {family.architectures} "
                         f"(a causal language model) is mapped")
    unknown = sorted(set(hf) - GENERIC_KEYS - COMMON_KEYS - family.keys)
    if unknown:
        raise ValueError(f"unsupported config.json keys {unknown} for {model_type=}")
    hf = {**family.defaults, **hf}  # an explicit null stays null (Mistral's sliding_window: null = no window)
    if param_dtype is None:
        name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        if name not in DTYPES:
            raise ValueError(f"unsupported checkpoint dtype {name=}, expected one of {tuple(DTYPES)}")
        param_dtype = DTYPES[name]
    num_heads = int(hf["num_attention_heads"])
    return TransformerConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        d_ff=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_len=int(hf["max_position_embeddings"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype or param_dtype,
        param_dtype=param_dtype,
        attention_impl=attention_impl,
        **_rope_settings(hf, model_type),
        **family.switches(hf),
    )


def tensor_names(model_type: str, num_layers: int) -> dict[tuple, str]:
    """Our parameter path (as in `nnx.to_flat_state`) -> checkpoint tensor name, for every layer."""
    table = {}
    for theirs, ours in HF_FAMILIES[model_type].tensors.items():
        layers = range(num_layers) if "{i}" in ours else [None]
        for i in layers:
            path = tuple(int(p) if p.isdigit() else p for p in ours.format(i=i).split("."))
            table[path] = theirs.format(i=i)
    return table
