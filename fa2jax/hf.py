"""`load_hf`: a Hugging Face model folder (config.json + safetensors shards) -> (TransformerConfig, Transformer).

Any family of `fa2jax.hf_families.HF_FAMILIES` (Llama, Mistral, Qwen2/3, Gemma 2/3 text): the
config maps onto the switches of our one decoder and the family's table names the checkpoint
tensor behind each of our parameters. The `safetensors` package reads the shards (no torch),
one tensor at a time straight into the target dtype: the model is built abstractly, each tensor
is read, transposed (torch's Linear stores [out, in]), reshaped to our layout and cast before the
next is read, so a large bf16 checkpoint never exists as a float32 copy. Hugging Face's RoPE
rotates feature i with i + D/2, as ours does, so projections load without permutation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import jax
from flax import nnx
from safetensors import safe_open

from fa2jax.config import TransformerConfig
from fa2jax.hf_families import IGNORED_SUFFIXES, config_from_hf, tensor_names
from fa2jax.model import Transformer


def read_config(directory: str | os.PathLike, *, dtype=None, param_dtype=None,
                attention_impl: str | None = None) -> TransformerConfig:
    """The TransformerConfig of a Hugging Face folder's config.json (no tensors read); see `config_from_hf`."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"no config.json in {str(directory)=}")
    return config_from_hf(json.loads(path.read_text(encoding="utf-8")), dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl)


class _Shards(contextlib.ExitStack):
    """The tensors of a folder's safetensors shards, read one at a time by name (a context manager)."""

    def __init__(self, directory: Path):
        super().__init__()
        index = directory / "model.safetensors.index.json"
        if index.exists():
            self.where = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        else:
            self.where = {}
            for shard in sorted(p.name for p in directory.glob("*.safetensors")):
                with safe_open(directory / shard, framework="flax") as f:
                    self.where.update((name, shard) for name in f.keys())
        if not self.where:
            raise ValueError(f"no *.safetensors files in {str(directory)=}")
        self.directory = directory
        self._open = {}

    def get(self, name: str) -> jax.Array:
        shard = self.where[name]
        if shard not in self._open:
            # framework="flax" reads bfloat16 too, which numpy cannot represent.
            self._open[shard] = self.enter_context(safe_open(self.directory / shard, framework="flax"))
        return self._open[shard].get_tensor(name)


def _to_layout(value: jax.Array, path: tuple, shape: tuple, dtype) -> jax.Array:
    """A checkpoint tensor in our layout: transposed if it is a torch Linear weight, heads split, cast."""
    if path[-1] == "kernel":
        value = value.T  # [out, in] -> [in, out]
    # Our kernels only split an axis into (heads, D): the kept axis must match, and the sizes.
    if value.size != math.prod(shape) or (value.ndim > 1 and value.shape[0] != shape[0]
                                          and value.shape[-1] != shape[-1]):
        raise ValueError(f"shape mismatch for {path=}: checkpoint {value.shape=} (as ours), model {shape=}")
    return value.reshape(shape).astype(dtype)


def load_hf(directory: str | os.PathLike, *, dtype=None, param_dtype=None,
            attention_impl: str | None = None) -> tuple[TransformerConfig, Transformer]:
    """Loads a Hugging Face checkpoint of any mapped family (config.json + safetensors shards).

    Args:
        directory: a `save_pretrained` directory (or a downloaded hub snapshot), sharded with
            model.safetensors.index.json or not.
        dtype: compute dtype; default the parameter dtype.
        param_dtype: parameter dtype; default the checkpoint's. Each tensor is cast as it is read.
        attention_impl: "pallas" | "xla" | "cudnn" | None, see `TransformerConfig`.

    Returns:
        (config, model) with every parameter taken from the checkpoint.

    Raises:
        ValueError: an unsupported family or setting (named), a tensor the config needs that the
            checkpoint lacks, a tensor the architecture does not use, or a shape mismatch.
    """
    directory = Path(directory)
    config = read_config(directory, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    model_type = json.loads((directory / "config.json").read_text(encoding="utf-8"))["model_type"]
    names = tensor_names(model_type, config.num_layers)

    # Build the module abstractly (no random init of a possibly large model), then fill in its leaves.
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    filled, used = [], set()
    with _Shards(directory) as shards:
        for path, variable in nnx.to_flat_state(state):
            name = names.get(path)
            if name is None:
                raise ValueError(f"the {model_type!r} table names no checkpoint tensor for parameter {path=}")
            if name not in shards.where:
                raise ValueError(f"the checkpoint lacks a tensor the config needs: {name=}")
            used.add(name)
            value = _to_layout(shards.get(name), path, variable.shape, config.param_dtype)
            filled.append((path, nnx.Param(value)))
        unused = {n for n in shards.where if n not in used and not n.endswith(IGNORED_SUFFIXES)}
    if config.tie_embeddings:
        unused.discard("lm_head.weight")  # some exporters save the tied matrix twice
    if unused:
        raise ValueError(f"the checkpoint has tensors this architecture does not use: {sorted(unused)[:5]=}")
    return config, nnx.merge(graphdef, nnx.from_flat_state(filled), rest)
