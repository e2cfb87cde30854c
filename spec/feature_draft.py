"""`FeatureDrafter`: a `fa2jax.feature_head.FeatureHead` (EAGLE-style) as a `spec.Drafter`.

The head drafts from the target's own final hidden states (Li et al., EAGLE, ICML'24): the node
of a tree at depth d reads the feature predicted at its parent (the root reads the target's
feature of the last committed token) and its own token's embedding, and predicts its own feature,
whose logits under the target's LM head propose its children. One `propose` per tree level is one
pass of the head's single layer over all N node slots plus the shared LM head.

State across steps: the head's one-layer KV cache holds its rows (f_i, x_{i+1}) for the committed
context, computed from the target's true features, never from its own predictions. So the drafter
sets `needs_target_hidden`: the loop hands `init` the target's prefill features and `commit` the
target's features at every tree node, and `commit` runs the head once over the accepted path to
append those rows (K/V only matter there; XLA drops the rest of that pass). The rows the tree
passes wrote are never committed, so `complete` has no pass to run: it only records the finished
tree's tokens, which `commit` reads.

A head with `feature_layers` (EAGLE-3's fused features) asks the loop for those layers' outputs
too (`target_hidden_layers`); it fuses them with the final state (`FeatureHead.read_target`) where
it reads the target, and `feature` holds the fused vector.

Index bookkeeping: with n committed target tokens x_0..x_{n-1} and the root x_n, the head has
n - 1 committed rows and the root is row n - 1 (input (f_{n-1}, x_n)); a depth-d node sits at
RoPE position n - 1 + d.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fa2jax import KVCache, Transformer
from fa2jax.feature_head import FeatureHead
from spec.decoder import _check_tree_fits_kernel
from spec.generation import cache_len


@struct.dataclass
class FeatureDraftState:
    """What a `FeatureDrafter` carries through the speculative loop."""

    # The head's rows of the committed context; lengths = the target's committed tokens - 1.
    cache: KVCache
    # The target's feature at its last committed token (fused, with feature_layers): the root's input.  # [B, d]
    feature: jax.Array
    # The head's predicted feature at every tree node, from the latest `propose`.  # [B, N, d]
    node_features: jax.Array
    # The tree's tokens as the latest `propose` / `complete` saw them.  # [B, N] int32
    tokens: jax.Array


def _shared_filter(path, value) -> bool:
    """The target's variables a head shares: the token embedding and the LM head (when untied)."""
    return path[0] in ("embed", "lm_head")


class FeatureDrafter:
    """Drafts with a feature head that shares the target's embedding and LM head.

    Example:
      drafter = FeatureDrafter(load_feature_head(path), target)
      decoder = SpeculativeDecoder(target, drafter, tree=DynamicTree(num_nodes=32, depth=6, top_k=4))

    `params` is {"head": the head's parameters, "shared": the target's embedding and LM head} (the
    same arrays as the target's, not copies); both are captured when the drafter is built.
    """

    needs_target_hidden = True
    # `complete` only records the tree's tokens: the loop calls it every step, without a conditional.
    complete_runs_a_pass = False

    def __init__(self, head: FeatureHead, target: Transformer):
        if not isinstance(head, FeatureHead):
            raise ValueError(f"head must be a fa2jax.feature_head.FeatureHead, got {type(head)=}")
        if not isinstance(target, Transformer):
            raise ValueError(f"target must be a fa2jax.Transformer, got {type(target)=}")
        head.config.check_target(target.config)
        self.config = head.config
        # The target's inner layers whose outputs the loop hands over besides the final state.
        self.target_hidden_layers = head.config.feature_layers
        self.vocab_size = target.config.vocab_size
        self.head_def, head_params = nnx.split(head)
        self.target_def, shared, rest = nnx.split(target, _shared_filter, ...)
        # The target's layers are never read here: shapes stand in for them, so the loop does not
        # receive the target's weights twice.
        self._target_rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rest)
        self.params = {"head": head_params, "shared": shared}

    def _modules(self, params) -> tuple[FeatureHead, Transformer]:
        target = nnx.merge(self.target_def, params["shared"], self._target_rest)
        return nnx.merge(self.head_def, params["head"]), target

    def check_capacity(self, committed: int, num_nodes: int, name: str) -> None:
        """Only the tree-kernel limit: `init` sizes the cache for the call."""
        _check_tree_fits_kernel(num_nodes, self.config.layer, name)

    def init(self, params, prompt, prompt_lengths, *, committed: int, num_nodes: int, target_hidden):
        """Reads the prompts with the target's prefill features `target_hidden` [B, P, target_width]."""
        head, target = self._modules(params)
        batch, prompt_len = prompt.shape
        target_hidden = head.read_target(target_hidden)  # [B, P, d]
        cache = head.init_cache(batch, cache_len(self.config.layer, committed, num_nodes))
        # Row i pairs f_i with x_{i+1}; the last prompt token's feature waits for the root.
        next_tokens = jnp.concatenate([prompt[:, 1:], jnp.zeros((batch, 1), prompt.dtype)], axis=1)  # [B, P]
        _, cache = head.prefill(target_hidden, target.embed_tokens(next_tokens), prompt_lengths - 1, cache)
        last = jnp.take_along_axis(target_hidden, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, d]
        dtype = self.config.layer.dtype
        return FeatureDraftState(
            cache=cache, feature=last.astype(dtype),
            node_features=jnp.zeros((batch, num_nodes, self.config.d_model), dtype),
            tokens=jnp.zeros((batch, num_nodes), jnp.int32))

    def propose(self, params, state: FeatureDraftState, tokens, tree_mask):
        head, target = self._modules(params)
        batch, n = tokens.shape
        mask = jnp.broadcast_to(jnp.asarray(tree_mask), (batch, n, n))
        depth = mask.sum(-1, dtype=jnp.int32) - 1  # [B, N]
        # parent[b, i, j]: j is i's ancestor one level up (the root's row is empty).
        parent = mask & (depth[:, None, :] == depth[:, :, None] - 1)  # [B, N, N]
        from_parent = jnp.einsum("bij,bjd->bid", parent.astype(state.node_features.dtype), state.node_features)
        features = jnp.where((depth == 0)[..., None], state.feature[:, None, :], from_parent)  # [B, N, d]
        positions = state.cache.lengths[:, None] + depth
        out, cache = head.extend(features, target.embed_tokens(tokens), positions, state.cache, tree_mask)
        return target.head_logits(out), state.replace(cache=cache, node_features=out, tokens=tokens)

    def complete(self, params, state: FeatureDraftState, tokens, tree_mask):
        return state.replace(tokens=tokens)

    def commit(self, state: FeatureDraftState, path, num_accepted, *, params, target_hidden):
        """Appends the head's rows of the accepted path, from the target's features `target_hidden`
        [B, N, target_width] at the tree's nodes; `params` runs that pass."""
        head, target = self._modules(params)
        batch, m = path.shape
        path_tokens = jnp.take_along_axis(state.tokens, path, axis=1)  # [B, M]
        path_hidden = head.read_target(jnp.take_along_axis(target_hidden, path[..., None], axis=1))
        path_hidden = path_hidden.astype(state.feature.dtype)  # [B, M, d]
        # Row j of the path pairs the feature before its token (the target's, at path node j - 1) with it.
        features = jnp.concatenate([state.feature[:, None], path_hidden[:, :-1]], axis=1)  # [B, M, d]
        positions = state.cache.lengths[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :]
        _, cache = head.extend(features, target.embed_tokens(path_tokens), positions, state.cache)
        last = jnp.take_along_axis(path_hidden, jnp.maximum(num_accepted - 1, 0)[:, None, None], axis=1)[:, 0]
        return state.replace(cache=cache.replace(lengths=state.cache.lengths + num_accepted),
                             feature=jnp.where((num_accepted > 0)[:, None], last, state.feature))
