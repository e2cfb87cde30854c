"""What a draft is to the speculative loop: the `Drafter` protocol, and `ModelDrafter` for a `Transformer`.

Each step the loop grows a token tree level by level (`spec.draft`): it asks every drafter for
its next-token logits at all N node slots of the partly filled tree, picks children from them,
and after verification tells each drafter which root path was accepted. A drafter keeps whatever
state it needs for that (a KV cache, an n-gram table, nothing) and never sees the target.

Every method but `check_capacity` runs inside the one jitted `lax.while_loop` of
`SpeculativeDecoder.generate`, so it must be pure and traceable; `params` is handed to the loop
as an argument (new weights do not recompile) and back to each call. The decoder wraps a plain
`Transformer` in `ModelDrafter`, so another kind of draft (a layer-skip model, n-gram lookup, a
fixed guess) only implements this protocol.

A drafter that reads the target's final hidden states (the vectors its LM head reads; an
EAGLE-style head, `spec.FeatureDrafter`) sets the class attribute `needs_target_hidden = True`
(absent means False). The loop then passes `init` the prefill's states as `target_hidden`
[B, P, d_model], and `commit` the states at every tree node as `target_hidden` [B, N, d_model]
together with the drafter's `params` (folding them in may take a pass of the draft). Such a
drafter may also set `target_hidden_layers`, a tuple of the target's inner layers whose outputs
come first on the last axis ([..., (k + 1) * d_model], `Transformer`'s `hidden_layers`); drafters
of one loop must agree on it. Other drafters are called exactly as before.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx

from fa2jax import Transformer
from spec.draft import complete_tree_kv
from spec.generation import cache_len, call_model


@runtime_checkable
class Drafter(Protocol):
    """A source of draft tokens for `SpeculativeDecoder`."""

    vocab_size: int  # V of the logits it proposes; must equal the target's
    params: Any  # pytree passed to the jitted loop and back to every call (() when there is none)

    def check_capacity(self, committed: int, num_nodes: int, name: str) -> None:
        """Raises a ValueError naming `name` when a call cannot fit `committed` tokens of context
        plus a tree of `num_nodes` past them (host side, before tracing)."""

    def init(self, params: Any, prompt: jax.Array, prompt_lengths: jax.Array, *, committed: int,
             num_nodes: int) -> Any:
        """The state after reading the prompts.

        Args:
          params: `self.params`, traced.
          prompt: right-padded prompts.  # [B, P] int32
          prompt_lengths: prompt lengths.  # [B] int32
          committed: static; prompt + new tokens the state must hold at most.
          num_nodes: static; N, tree nodes per step.
          target_hidden: keyword, only with `needs_target_hidden`: the target's prefill hidden
            states.  # [B, P, d_model]

        Returns:
          Any pytree: the drafter's state, carried through the loop.
        """

    def propose(self, params: Any, state: Any, tokens: jax.Array, tree_mask) -> tuple[jax.Array, Any]:
        """Next-token logits at every node of a partly filled tree.

        Node 0 is the root (the last emitted token, not yet committed); nodes not chosen yet hold
        placeholder tokens and only see the root and themselves, so they never change a chosen
        node's logits.

        Args:
          params: `self.params`, traced.
          state: from `init` / `commit`.
          tokens: node tokens, parents before children.  # [B, N] int32
          tree_mask: tree_mask[i, j] iff j is i or an ancestor of i.  # [N, N] or [B, N, N] bool

        Returns:
          (logits # [B, N, V] float32, state with the nodes recorded past the committed context;
          what a node's record holds may rest on placeholders, see `complete`).
        """

    def complete(self, params: Any, state: Any, tokens: jax.Array, tree_mask) -> Any:
        """The state with every node of the finished tree recorded exactly (the loop calls this
        only in steps that accept a node deeper than drafting left exact, unless the drafter sets
        the class attribute `complete_runs_a_pass = False`: then every step, as it is cheap)."""

    def commit(self, state: Any, path: jax.Array, num_accepted: jax.Array) -> Any:
        """Appends the accepted root path to the committed context.

        Args:
          state: after `propose` / `complete` on this step's tree.
          path: node indices of the path from the root.  # [B, depth + 1] int32
          num_accepted: path nodes to keep per row, 0 for a stopped row.  # [B] int32
          params, target_hidden: keywords, only with `needs_target_hidden`: `self.params` (traced)
            and the target's hidden states at the tree's nodes.  # [B, N, d_model]
        """


class ModelDrafter:
    """A draft `Transformer`: its KV cache is the state, one `score_tree` pass a proposal."""

    def __init__(self, model: Transformer):
        self.config = model.config
        self.vocab_size = model.config.vocab_size
        self.graphdef, self.params = nnx.split(model)

    def check_capacity(self, committed: int, num_nodes: int, name: str) -> None:
        """Nothing to check: `init` sizes the cache for the call (see `spec.generation.cache_len`)."""

    def init(self, params, prompt, prompt_lengths, *, committed: int, num_nodes: int):
        model = nnx.merge(self.graphdef, params)
        cache = model.init_cache(prompt.shape[0], cache_len(self.config, committed, num_nodes))
        return model.prefill(prompt, prompt_lengths, cache)[1]

    def propose(self, params, state, tokens, tree_mask):
        return call_model(self.graphdef, params, "score_tree", tokens, tree_mask, state)

    def complete(self, params, state, tokens, tree_mask):
        return complete_tree_kv(self.graphdef, params, state, tokens, tree_mask)

    def commit(self, state, path, num_accepted):
        return state.accept(path, num_accepted)


def as_drafter(draft: Transformer | Drafter) -> Drafter:
    """`draft` itself if it is a Drafter, a `ModelDrafter` if it is a Transformer."""
    if isinstance(draft, nnx.Module):
        return ModelDrafter(draft)
    if isinstance(draft, Drafter):
        return draft
    raise ValueError(f"a draft must be a Transformer or implement spec.Drafter, got {type(draft)=}")
