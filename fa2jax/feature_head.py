"""`FeatureHead`: an EAGLE-style draft head that predicts the target's next hidden feature.

Algorithm (Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty",
ICML'24, §4.1): the target's final hidden state f_t (the vector its LM head reads) carries most
of what the next token needs, so a small head can predict f_{t+1} from f_t and the token sampled
after it, x_{t+1}: f^_{t+1} = layer(fc([f_t ; e(x_{t+1})])). The head owns one decoder layer
(`fa2jax.model.Block`, with the target's widths and family switches) and the 2d -> d `fc`; it
borrows the target's token embedding e and LM head, which are not part of its parameters, so
logits of the next-next token are the target's `head_logits(f^_{t+1})`. Drafting deeper tree
levels feeds f^ back in place of f (`spec.feature_draft`); `fa2jax.training.feature_draft` trains
it on the target's own features.

Sequence layout: row i of the head's input is (f_i, x_{i+1}) at RoPE position i, and its output
predicts f_{i+1}. Its KV cache has one layer and the target's head geometry.

Fused features (EAGLE-3, Li et al. 2025, §3): with `FeatureHeadConfig.feature_layers` the head also
reads the outputs of some of the target's inner layers (low, middle, high), which carry more about
the tokens after the next one than the final state does. `read_target` fuses them with the final
state into one d-vector (the inner parts RMS-normalised, since residual streams grow with depth;
the final state is normalised already; then a (k + 1)d -> d projection `fuse`), which takes f's
place in the first level; deeper levels read the head's own outputs as before. `widen_head`
starts a fused head from a plain one: `fuse` passes the final state through, so it drafts as the
plain head did until training finds a use for the inner layers.

Checkpoints: `save_feature_head` / `load_feature_head` write and read a `step_*` folder of
`fa2jax.checkpoint` (orbax state/ with {"params": ...}, meta/meta.json with "feature_head_config");
`is_feature_head` tells one from a model checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from fa2jax import checkpoint as ckpt
from fa2jax.config import TransformerConfig
from fa2jax.kv_cache import KVCache
from fa2jax.model import Block, check_inner_layers
from fa2jax.tokenizer import Tokenizer

# meta.json key of a head's config; a Transformer checkpoint has "model_config" instead.
CONFIG_KEY = "feature_head_config"


@dataclasses.dataclass(frozen=True)
class FeatureHeadConfig:
    """Shape and numerics of a feature head.

    Attributes:
      layer: the one decoder layer (num_layers == 1): the target's d_model and vocab_size, and by
        default its heads, MLP and family switches (see `for_target`).
      fc_bias: a bias on the 2d -> d input projection (EAGLE has one).
      feature_layers: the target's decoder layers (0-based, strictly increasing, below its last)
        whose outputs the head reads besides the final hidden state, fused by `read_target`
        (EAGLE-3); empty: the final hidden state alone (EAGLE, EAGLE-2).
    """

    layer: TransformerConfig
    fc_bias: bool = True
    feature_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.layer, TransformerConfig):
            raise ValueError(f"layer must be a TransformerConfig, got {type(self.layer)=}")
        # A tuple (JSON gives a list; configs stay hashable), checked against no target yet.
        object.__setattr__(self, "feature_layers", check_inner_layers(self.feature_layers, name="feature_layers"))
        if self.layer.num_layers != 1:
            raise ValueError(f"a feature head has one decoder layer, got {self.layer.num_layers=}")
        if self.layer.invariant_rows:
            raise ValueError(f"a feature head has no batch-invariant mode, got {self.layer.invariant_rows=}")

    @classmethod
    def for_target(cls, target: TransformerConfig, fc_bias: bool = True, feature_layers: tuple[int, ...] = (),
                   **layer_changes) -> FeatureHeadConfig:
        """A head for `target`: one layer with its widths and family switches, full attention
        (no window pattern), plain cached calls and the unfused (trained) projection layout;
        `layer_changes` overrides fields (e.g. d_ff, dtype). `feature_layers` must lie below the
        target's last layer."""
        layer = target.replace(num_layers=1, layer_windows=(), local_rope_theta=None, invariant_rows=0,
                               tokenizer_vocab_size=None, fused_projections=False)
        config = cls(layer=layer.replace(**layer_changes) if layer_changes else layer, fc_bias=fc_bias,
                     feature_layers=tuple(feature_layers))
        config.check_target(target)
        return config

    @property
    def d_model(self) -> int:
        return self.layer.d_model

    @property
    def vocab_size(self) -> int:
        return self.layer.vocab_size

    @property
    def target_width(self) -> int:
        """Width of the target's hidden states the head reads: (len(feature_layers) + 1) * d_model."""
        return (len(self.feature_layers) + 1) * self.d_model

    def check_target(self, target: TransformerConfig) -> None:
        """Raises a ValueError unless `target` has the d_model and vocabulary this head was built
        for, and layers past its `feature_layers`."""
        if (target.d_model, target.vocab_size) != (self.d_model, self.vocab_size):
            raise ValueError(f"the head predicts features of width {self.d_model} over {self.vocab_size} tokens, "
                             f"but the target has {target.d_model=} {target.vocab_size=}")
        try:
            check_inner_layers(self.feature_layers, target.num_layers, "feature_layers")
        except ValueError as e:
            raise ValueError(f"the target cannot give this head its inner layers: {e}") from None

    def replace(self, **layer_changes) -> FeatureHeadConfig:
        """A copy with fields of `layer` changed (dtype, attention_impl, max_len, ...)."""
        return dataclasses.replace(self, layer=self.layer.replace(**layer_changes))


def parse_feature_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """A command line's `feature_layers`: "" (none), "eagle3" (the target's layers 1, L/2 - 1 and
    L - 4, i.e. the inputs of layers 2, L/2 and L - 3: EAGLE-3's low, middle and high features),
    or comma-separated layer indices ("2,14,26"). Raises a ValueError naming the text otherwise."""
    text = text.strip()
    if not text:
        return ()
    if text == "eagle3":
        if num_layers < 5:
            raise ValueError(f"feature layers 'eagle3' need a target of at least 5 layers, got {num_layers=}")
        return (1, num_layers // 2 - 1, num_layers - 4)
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"feature layers must be '', 'eagle3' or comma-separated ints, got {text!r}") from None
    try:
        return check_inner_layers(layers, num_layers, "feature layers")
    except ValueError as e:
        raise ValueError(f"{e} (from {text!r})") from None


class FeatureHead(nnx.Module):
    """fc([f ; e]) then one decoder block: features and embeddings [B, T, d] -> predicted features [B, T, d].

    Parameters: `fc` (nnx.Linear [2d, d]) and `block` (`fa2jax.model.Block`), and `fuse`
    (nnx.Linear [(k + 1)d, d], no bias) with k = len(config.feature_layers) > 0; no embedding, no LM head.
    """

    def __init__(self, config: FeatureHeadConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config.layer
        self.fc = nnx.Linear(2 * c.d_model, c.d_model, use_bias=config.fc_bias, dtype=c.dtype,
                             param_dtype=c.param_dtype, rngs=rngs)
        self.block = Block(c, 0, rngs=rngs)
        self.fuse = nnx.Linear(config.target_width, c.d_model, use_bias=False, dtype=c.dtype,
                               param_dtype=c.param_dtype, rngs=rngs) if config.feature_layers else None

    def read_target(self, hidden: jax.Array) -> jax.Array:
        """The target's hidden states as the head reads them: [..., target_width] -> [..., d].

        Without `feature_layers` that is the final hidden state itself, unchanged; with them, the
        inner layers' outputs (RMS-normalised) and the final state (the target's `hidden_layers`
        output), through `fuse`."""
        if hidden.shape[-1] != self.config.target_width:
            raise ValueError(f"the head reads target hidden states of width {self.config.target_width} "
                             f"(feature_layers={self.config.feature_layers}, d_model={self.config.d_model}), "
                             f"got {hidden.shape=}")
        if self.fuse is None:
            return hidden
        d = self.config.d_model
        inner = hidden[..., :-d].astype(jnp.float32).reshape(*hidden.shape[:-1], -1, d)
        inner = inner * jax.lax.rsqrt(jnp.mean(inner * inner, axis=-1, keepdims=True) + self.config.layer.norm_eps)
        parts = [inner.reshape(*hidden.shape[:-1], -1), hidden[..., -d:].astype(jnp.float32)]
        return self.fuse(jnp.concatenate(parts, axis=-1).astype(self.config.layer.dtype))

    def _inputs(self, features: jax.Array, embeddings: jax.Array) -> jax.Array:
        """[B, T, d] target (or predicted) features and [B, T, d] embeddings of the next tokens -> [B, T, d]."""
        dtype = self.config.layer.dtype
        return self.fc(jnp.concatenate([features.astype(dtype), embeddings.astype(dtype)], axis=-1))

    def __call__(self, features: jax.Array, embeddings: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Training forward over packed rows: causal within each segment.

        Args:
          features: f_i, the target's final hidden states.  # [B, T, d]
          embeddings: e(x_{i+1}), the embeddings of the tokens after them.  # [B, T, d]
          segment_ids, positions: as `Transformer.__call__`.  # [B, T] int

        Returns:
          predicted f_{i+1}.  # [B, T, d] in the compute dtype
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(features.shape[1], dtype=jnp.int32), features.shape[:2])
        return self.block(self._inputs(features, embeddings), segment_ids=segment_ids, positions=positions)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty one-layer cache of `batch` rows of `max_len` slots (default dtype: the compute dtype)."""
        c = self.config.layer
        return KVCache.create(1, batch, max_len, c.num_kv_heads, c.head_dim, dtype or c.dtype)

    def prefill(self, features: jax.Array, embeddings: jax.Array, lengths: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Right-padded rows from position 0: ([B, T, d] predicted features, cache with lengths = lengths)."""
        out, cache = self.block.prefill(self._inputs(features, embeddings), cache, 0)
        return out, cache.replace(lengths=jnp.asarray(lengths, jnp.int32))

    def extend(self, features: jax.Array, embeddings: jax.Array, positions: jax.Array, cache: KVCache,
               tree_mask=None) -> tuple[jax.Array, KVCache]:
        """T new rows attending to the cache, written at slots lengths + [0, T) (lengths unchanged).

        Args:
          features, embeddings: as `__call__`.  # [B, T, d]
          positions: RoPE positions.  # [B, T] int32
          cache: the committed rows.
          tree_mask: None for a chain (causal among the new rows), else the tree's ancestor mask.  # [T, T] or [B, T, T]

        Returns:
          (predicted features # [B, T, d], cache with the rows' K/V written).
        """
        return self.block.extend(self._inputs(features, embeddings), positions, cache, 0, tree_mask)


def widen_head(source: FeatureHead, config: FeatureHeadConfig, *, rngs: nnx.Rngs | None = None) -> FeatureHead:
    """A head of `config` that starts from `source`'s trained weights (warm start).

    `fc` and `block` are `source`'s (cast to `config`'s parameter dtype); `fuse` is copied when
    both read the same `feature_layers`, and when `source` reads none it passes the final hidden
    state through (zeros on the inner parts), so the new head drafts exactly as `source` did.

    Raises:
      ValueError: the layer configs differ in a parameter shape, or both have other non-empty
        `feature_layers`.
    """
    def shapes(head_config):
        abstract = nnx.eval_shape(lambda: FeatureHead(dataclasses.replace(head_config, feature_layers=()),
                                                      rngs=nnx.Rngs(0)))
        return jax.tree.map(lambda x: x.shape, nnx.state(abstract, nnx.Param))

    if shapes(source.config) != shapes(config) or source.config.fc_bias != config.fc_bias:
        raise ValueError(f"widen_head needs the same layer shapes: {source.config=} vs {config=}")
    if source.config.feature_layers and source.config.feature_layers != config.feature_layers:
        raise ValueError(f"the source head reads feature_layers={source.config.feature_layers}, the new one "
                         f"{config.feature_layers}: only a plain head (none) widens to other layers")
    head = FeatureHead(config, rngs=rngs or nnx.Rngs(0))
    dtype = jnp.dtype(config.layer.param_dtype)
    # Copies, never the source's arrays: a training step donates the new head's buffers.
    copy = lambda x: jnp.array(x, dtype=dtype, copy=True)  # noqa: E731
    for name in ("fc", "block") + (("fuse",) if source.fuse is not None else ()):
        nnx.update(getattr(head, name), jax.tree.map(copy, nnx.state(getattr(source, name), nnx.Param)))
    if source.fuse is None and head.fuse is not None:
        d = config.d_model
        head.fuse.kernel[...] = jnp.zeros((config.target_width, d), dtype).at[-d:].set(jnp.eye(d, dtype=dtype))
    return head


def count_params(head: FeatureHead) -> int:
    """Number of parameters of `head` (the shared embedding and LM head are not its own)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(head, nnx.Param)))


def save_feature_head(head: FeatureHead, directory: str | os.PathLike, *, step: int = 0, dtype=None,
                      metadata: dict | None = None, tokenizer: Tokenizer | None = None) -> Path:
    """Writes `head` as checkpoint `step` of `directory` (orbax, `fa2jax.checkpoint.save_checkpoint`).

    Args:
      head: the head to save.
      directory: folder of the `step_*` checkpoint (created if missing; that step is replaced).
      step: the checkpoint's step (training steps taken).
      dtype: cast the floating parameters (and the stored compute dtype) to this, e.g. bfloat16 to ship.
      metadata: more JSON-able values for meta.json (the training settings, the target's path).
      tokenizer: saved alongside when given (the target's, so the folder is self-describing).

    Returns:
      The checkpoint folder.
    """
    config, params = head.config, nnx.state(head, nnx.Param)
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        config = config.replace(dtype=dtype, param_dtype=dtype)
    meta = {**(metadata or {}), CONFIG_KEY: ckpt.config_to_dict(config)}
    return ckpt.save_checkpoint(directory, step, {"params": params}, meta, tokenizer, keep=1)


def is_feature_head(path: str | os.PathLike) -> bool:
    """Whether `path` is a head checkpoint (or a folder of them, judged by its newest): its
    meta.json has `CONFIG_KEY`. False for anything else, a model or a missing path included."""
    found = ckpt.find_checkpoint(path)
    return found is not None and CONFIG_KEY in ckpt.read_metadata(found)


def read_feature_head_config(path: str | os.PathLike) -> FeatureHeadConfig:
    """The config of a head checkpoint (or of the newest checkpoint in a folder of them)."""
    path = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_metadata(path)
    if CONFIG_KEY not in meta:
        raise ValueError(f"{str(path)!r} is not a feature head checkpoint (its meta.json has no {CONFIG_KEY!r}; "
                         f"a Transformer checkpoint loads with fa2jax.load_pretrained)")
    values = dict(meta[CONFIG_KEY])
    return FeatureHeadConfig(layer=ckpt.model_config_from_dict(values.pop("layer")), **values)


def load_feature_head(path: str | os.PathLike, *, dtype=None, **layer_changes) -> FeatureHead:
    """A head saved by `save_feature_head`.

    Args:
      path: a `step_*` folder, or a folder holding them (the newest is read).
      dtype: compute and parameter dtype to cast to; None keeps the stored ones.
      **layer_changes: fields of the layer config that keep parameter shapes (attention_impl, max_len).

    Returns:
      The head, its digests checked (`fa2jax.checkpoint.load_checkpoint`).
    """
    path = ckpt.resolve_checkpoint(path).absolute()  # orbax reads absolute paths only
    config = read_feature_head_config(path)
    abstract = nnx.eval_shape(lambda: FeatureHead(config, rngs=nnx.Rngs(0)))
    graphdef, target = nnx.split(abstract, nnx.Param)
    state, _ = ckpt.load_checkpoint(path, {"params": target})
    head = nnx.merge(graphdef, state["params"])
    changes = dict(layer_changes)
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        changes.update(dtype=dtype, param_dtype=dtype)
    if not changes:
        return head
    twin = nnx.eval_shape(lambda: FeatureHead(config.replace(**changes), rngs=nnx.Rngs(0)))
    cast = (lambda x: x) if dtype is None else (
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x)
    nnx.update(twin, jax.tree.map(cast, nnx.state(head, nnx.Param)))
    return twin
