"""What the jitted steps carry: a `Transformer` split for functional use, and the train state."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx, struct

from fa2jax.config import TransformerConfig
from fa2jax.model import Transformer


@struct.dataclass
class TrainState:
    """What one train step updates (donated to it and returned anew)."""

    step: jax.Array  # [] int32, optimizer steps taken; also the position in the data order
    params: Any  # nnx.State of the model's nnx.Param variables, in param_dtype (float32)
    opt_state: Any  # optax state over `params`

    def to_tree(self) -> dict:
        """The checkpointed form (plain dict keys: stable, readable tree paths)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}


@dataclasses.dataclass(frozen=True, eq=False)
class ModelParts:
    """A Transformer split for functional use: graphdef (static), params, other variables."""

    config: TransformerConfig
    graphdef: Any
    params: Any  # nnx.State of nnx.Param
    rest: Any  # nnx.State of every other variable (empty for the plain model)

    @classmethod
    def init(cls, config: TransformerConfig, seed: int, abstract: bool = False) -> ModelParts:
        """A freshly initialised model; `abstract=True` gives ShapeDtypeStruct params (no memory)
        to load a checkpoint into."""
        make = lambda: Transformer(config, rngs=nnx.Rngs(seed))  # noqa: E731
        graphdef, params, rest = nnx.split(nnx.eval_shape(make) if abstract else make(), nnx.Param, ...)
        if abstract and jax.tree.leaves(rest):  # non-parameter variables are not checkpointed
            rest = nnx.split(make(), nnx.Param, ...)[2]
        return cls(config, graphdef, params, rest)

    @classmethod
    def from_model(cls, model: Transformer) -> ModelParts:
        """The parts of a built model, e.g. a teacher from `fa2jax.load_pretrained`."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(model.config, graphdef, params, rest)

    def module(self) -> Transformer:
        """The nnx Transformer with these parameters."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def logits(self, params: Any, rest: Any, batch: dict, zigzag: bool = False) -> jax.Array:
        """[B, T, V] float32 logits of a packed batch (tokens / segment_ids / positions [B, T]);
        `zigzag`: the batch and logits are in the context axis's zig-zag order (`Transformer`)."""
        model = nnx.merge(self.graphdef, params, rest)
        return model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"], zigzag=zigzag)
