"""`SpeculativeDecoder`: SpecInfer-style tree speculative decoding as one jit-compiled while loop.

Algorithm (Miao et al., "SpecInfer", ASPLOS'24): per step the drafts grow a token tree rooted at
the last emitted token (`spec.draft`), the target scores every node in one `score_tree` pass,
verification keeps the longest acceptable root path plus one token of the target's own
(`spec.verify`), and the target's cache and every draft's state commit that path
(`KVCache.accept`, `Drafter.commit`). A step emits between 1 and depth + 1 tokens for a single
target pass; the output is exactly the target's own greedy decoding (verify="greedy") or has
exactly the target's sampling distribution (verify="stochastic"). A draft is anything that
implements `spec.Drafter`; a plain `Transformer` is wrapped in `spec.ModelDrafter`. A drafter that
sets `needs_target_hidden` (the EAGLE-style `spec.FeatureDrafter`) also gets the target's final
hidden states of the prefill and of every scored tree.

The loop is a `lax.while_loop` over `DecodeState`. Prefill, the loop and the result are three
jitted functions, each compiled once per (batch, prompt length, max_new_tokens) and decoder; the
loop's step limit is traced, so a whole generation and one run in chunks (`stream` or
`stop_strings`: `chunk_steps` steps at a time, the host streaming and checking stop strings in
between, `spec.streaming`) share one compile of it. Rows advance by different amounts and stop at
any of the `eos_id` tokens or at `max_new_tokens`; a stopped row keeps running through the batched
passes but commits nothing.

Caches are sized prompt + max_new_tokens + N, whatever the models' `max_len`: the root is emitted
but not cached, so at most prompt + max_new_tokens - 1 tokens are committed while a tree of N nodes
is written past them (N becomes the model's invariant_rows when it has more: see
`spec.generation.cache_len`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from fa2jax import KVCache, Transformer, fuse_projections
from pallas_kernels.tree.arguments import MAX_NODES
from spec import verify as verify_lib
from spec.draft import draft_dynamic_tree, draft_static_tree, static_exact_kv_depths
from spec.drafters import Drafter, ModelDrafter, as_drafter
from spec.generation import (
    GenerationResult, GenerationStats, cache_len, check_generate_args, emit_tokens, first_token)
from spec.streaming import DEFAULT_CHUNK_STEPS, check_stream_args, run_chunked
from spec.trees import DynamicTree, ExpansionTree, MergedTree, TokenTree

VERIFY_MODES = ("greedy", "stochastic")


@struct.dataclass
class DecodeState:
    """Loop state of speculative decoding."""

    # Prompt followed by the emitted tokens; 0 past lengths.  # [B, P + M] int32
    tokens: jax.Array
    # Filled tokens of each row in `tokens`.  # [B] int32
    lengths: jax.Array
    # prompt length + max_new_tokens: where a row must stop.  # [B] int32
    limit: jax.Array
    # Last emitted token: next tree's root, in no cache yet.  # [B] int32
    root: jax.Array
    # Rows that hit EOS or their limit.  # [B] bool
    done: jax.Array
    # Target's committed context: prompt + emitted tokens except the root.
    target_cache: KVCache
    # One state per draft (a KVCache for a draft model), committed in lockstep with the target's.
    draft_caches: tuple[Any, ...]
    # PRNG key, split once per step.
    rng: jax.Array
    # Target passes so far, prefill included.  # [] int32
    target_calls: jax.Array
    # hist[k]: (active row, step) pairs that emitted k tokens.  # [max_depth + 2] int32
    accepted_histogram: jax.Array


def _as_tree(tree) -> ExpansionTree | MergedTree | DynamicTree:
    if isinstance(tree, (ExpansionTree, MergedTree, DynamicTree)):
        return tree
    if isinstance(tree, (tuple, list)):
        return ExpansionTree(tuple(tree))
    raise ValueError(f"tree must be an ExpansionTree, MergedTree, DynamicTree or a widths tuple: {tree=}")


def _check_tree_fits_kernel(num_nodes: int, config, name: str) -> None:
    """Raises when `config`'s model would score the tree with the Pallas tree kernel (attention_impl
    "pallas", or None on a GPU: see `fa2jax.attention`), which takes at most MAX_NODES rows."""
    rows = max(num_nodes, config.invariant_rows)
    uses_kernel = config.attention_impl == "pallas" or (config.attention_impl is None and jax.default_backend() == "gpu")
    if uses_kernel and rows > MAX_NODES:
        rows_note = "" if rows == num_nodes else f" ({rows} rows per call with invariant_rows={rows})"
        raise ValueError(
            f"the tree has {num_nodes} nodes{rows_note}, but {name} scores it with the Pallas tree-attention "
            f"kernel, which takes at most {MAX_NODES}: use a smaller tree, or attention_impl='xla' for that model")


class SpeculativeDecoder:
    """Tree speculative decoding of a target `Transformer` with one or more drafts.

    Example:
      decoder = SpeculativeDecoder(target, [draft], tree=ExpansionTree.specinfer())
      result = decoder.generate(prompt, prompt_lengths, max_new_tokens=64)

    The models' parameters are captured when the decoder is built (`nnx.split`), with the
    projections of the target and of draft Transformers fused (`fa2jax.fuse_projections`) unless
    `fused=False`.
    """

    def __init__(self, target: Transformer, drafts: Transformer | Drafter | Sequence[Transformer | Drafter], *,
                 tree=None, verify: str = "greedy", fused: bool = True):
        """Builds the decoder.

        Args:
          target: the model whose output is reproduced.
          drafts: one draft, or one per subtree of a `MergedTree`: `Transformer`s (wrapped in
            `ModelDrafter`) or anything implementing `spec.Drafter`.
          tree: ExpansionTree, MergedTree (one ExpansionTree per draft), DynamicTree, or a widths
            tuple; default SpecInfer's (1, 1, 3, 1, 1, 1, 1, 1).
          verify: "greedy" (temperature 0 only) or "stochastic" (any temperature, lossless).
          fused: run the target and draft Transformers with fused projections (the same function
            in fewer kernels per pass); False keeps the models' own layout.
        """
        drafts = (drafts,) if isinstance(drafts, (nnx.Module, Drafter)) else tuple(drafts)
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {fused=}")
        if fused:
            target, *drafts = (fuse_projections(m) if isinstance(m, Transformer) else m for m in (target, *drafts))
        tree = ExpansionTree.specinfer() if tree is None else _as_tree(tree)
        if verify not in VERIFY_MODES:
            raise ValueError(f"{verify=} is not one of {VERIFY_MODES}")
        if not drafts:
            raise ValueError(f"need at least one draft model: {drafts=}")
        if tree.num_drafts != len(drafts):
            raise ValueError(f"the tree expands {tree.num_drafts} draft(s) but {len(drafts)=} were given")
        self.drafters = tuple(as_drafter(d) for d in drafts)
        # Which drafters read the target's final hidden states (see `spec.Drafter`).
        self._needs_hidden = tuple(bool(getattr(d, "needs_target_hidden", False)) for d in self.drafters)
        # ... and which of the target's inner layers' outputs come with them (one set for all).
        layer_sets = {tuple(getattr(d, "target_hidden_layers", ())) for d, needs in zip(self.drafters,
                                                                                          self._needs_hidden) if needs}
        if len(layer_sets) > 1:
            raise ValueError(f"drafters that read the target's hidden states must ask for the same inner layers, "
                             f"got target_hidden_layers {sorted(layer_sets)}")
        self._hidden_layers = layer_sets.pop() if layer_sets else ()
        vocab = target.config.vocab_size
        for i, d in enumerate(self.drafters):
            if d.vocab_size != vocab:
                raise ValueError(f"draft {i} has another vocabulary than the target: {d.vocab_size=} vs {vocab=}")
        self.tree = tree
        self.verify = verify
        self.vocab_size = vocab
        self._target_config = target.config
        self._target_def, self._target_params = nnx.split(target)
        self._draft_params = tuple(d.params for d in self.drafters)
        # The draft models' graphdefs (None for other drafters), for tests that call them directly.
        self._draft_defs = tuple(getattr(d, "graphdef", None) for d in self.drafters)
        self._static = isinstance(tree, (ExpansionTree, MergedTree))
        if self._static:
            self._topology = tree.topology()
            self.num_nodes, self.depth = self._topology.num_nodes, self._topology.max_depth
            self._exact_kv_depths = static_exact_kv_depths(self._topology, len(drafts))
        else:
            self.num_nodes, self.depth = tree.num_nodes, tree.depth
            self._exact_kv_depths = (tree.depth - 1,)
        rows = target.config.invariant_rows
        if rows and self.num_nodes > rows:
            raise ValueError(f"the tree has {self.num_nodes} nodes, more than the target's "
                             f"invariant_rows={rows} (rows of every batch-invariant call)")
        models = [("the target", target.config)] + [
            (f"draft {i}", d.config) for i, d in enumerate(self.drafters) if isinstance(d, ModelDrafter)]
        for name, config in models:
            _check_tree_fits_kernel(self.num_nodes, config, name)
        # Under greedy verification no node is sampled: children are the draft's top-k.
        self._sampled = tree.sampled_nodes() if verify == "stochastic" else np.zeros(self.num_nodes, bool)
        # One compile of each serves whole generations and chunked ones (streaming, stop strings)
        # alike: the loop's step limit is traced. The loop takes over its input state's buffers (the
        # caches are most of the memory), so a generation holds one copy of them, as one jitted
        # function would.
        self._init_jit = jax.jit(self.init_state, static_argnames=("max_new_tokens",))
        self._run_jit = jax.jit(self.run, donate_argnames=("state",))
        self._result_jit = jax.jit(self.result)

    @property
    def exact_kv_depths(self) -> tuple[int, ...]:
        """Per draft, the deepest tree depth whose K/V drafting leaves exact (deeper ones need
        the fix-up pass when accepted)."""
        return self._exact_kv_depths

    # -- the three pure pieces of a step -------------------------------------------------------

    def draft(self, draft_params, caches, root, key, temperature, top_p, top_k=0,
              min_p=0.0) -> tuple[TokenTree, tuple[Any, ...]]:
        """Grows this step's token tree (see `spec.draft`).

        Args:
          draft_params: the drafters' params.
          caches: the drafters' states.
          root: last emitted token per row.  # [B] int32
          key: PRNG key.
          temperature, top_p, top_k, min_p: sampling warp (scalars).

        Returns:
          (tree, draft states with the tree recorded, exact except at depths past
          `exact_kv_depths`: see `complete_draft_kv`).
        """
        if self._static:
            return draft_static_tree(
                self.drafters, draft_params, caches, root, key, topology=self._topology,
                sampled=self._sampled, vocab_size=self.vocab_size, temperature=temperature, top_p=top_p,
                top_k=top_k, min_p=min_p)
        tree, state = draft_dynamic_tree(
            self.drafters[0], draft_params[0], caches[0], root, tree=self.tree, temperature=temperature,
            top_p=top_p, top_k=top_k, min_p=min_p, sampling=self.verify == "stochastic")
        return tree, (state,)

    def complete_draft_kv(self, draft_params, caches, tree: TokenTree, accepted_depth) -> tuple[Any, ...]:
        """Makes the drafts' states (K/V) exact along every path that will be committed.

        Drafting leaves the deepest nodes' K/V computed from placeholder tokens (`spec.draft`). One
        more pass (`Drafter.complete`) fixes them, but it is needed only when some row accepts such
        a node, so it runs under `lax.cond`: most steps skip it.

        Args:
          draft_params: the drafters' params.
          caches: the drafters' states after `draft`.
          tree: this step's tree.
          accepted_depth: depth of the deepest node each row commits, -1 for none.  # [B] int32

        Returns:
          the drafts' states, exact wherever `accept` will read.
        """
        mask = self._topology.ancestor_mask if self._static else tree.mask
        deepest = jnp.max(accepted_depth)
        completed = []
        for d, p, c, exact in zip(self.drafters, draft_params, caches, self._exact_kv_depths):
            if not getattr(d, "complete_runs_a_pass", True):
                # Nothing to skip: a conditional would only cost a host round trip on a GPU.
                completed.append(d.complete(p, c, tree.tokens, mask))
                continue
            completed.append(jax.lax.cond(
                deepest > exact, lambda c, d=d, p=p: d.complete(p, c, tree.tokens, mask), lambda c: c, c))
        return tuple(completed)

    def score(self, target_params, cache, tree: TokenTree, return_hidden: bool = False):
        """The target's logits at every node.  Returns (logits # [B, N, V], cache with the nodes' K/V),
        then the final hidden states # [B, N, d_model] with `return_hidden`."""
        # A static tree's mask is its topology's (NumPy, so the kernels get it packed at trace time).
        mask = self._topology.ancestor_mask if self._static else tree.mask
        target = nnx.merge(self._target_def, target_params)
        return target.score_tree(tree.tokens, mask, cache, return_hidden=return_hidden,
                                 hidden_layers=self._hidden_layers if return_hidden else ())

    def verify_tree(self, target_logits, tree: TokenTree, key, temperature, top_p, top_k=0,
                    min_p=0.0) -> verify_lib.VerifyResult:
        """Accepted path and bonus token (see `spec.verify`); the warp is the drafts' one."""
        if self.verify == "greedy":
            return verify_lib.verify_greedy(target_logits, tree, max_depth=self.depth)
        return verify_lib.verify_stochastic(
            target_logits, tree, key, sampled=self._sampled, max_depth=self.depth, temperature=temperature,
            top_p=top_p, top_k=top_k, min_p=min_p)

    def accept(self, state: DecodeState, tree: TokenTree, result: verify_lib.VerifyResult, target_cache,
               draft_caches, eos_id, draft_params=None, target_hidden=None) -> DecodeState:
        """Emits the accepted tokens and commits the accepted path in every cache.

        Args:
          state: loop state before this step.
          tree: this step's tree.
          result: its verification.
          target_cache, draft_caches: the target's cache and the drafts' states holding the tree
            past the committed context.
          eos_id: the ids that end a row, scalar or [n_eos]; -1 for none.
          draft_params, target_hidden: the drafters' params and the target's final hidden states at
            the tree's nodes [B, N, d_model], for the drafters that set `needs_target_hidden`.

        Returns:
          the state after this step.
        """
        num = result.num_accepted  # [B], path nodes incl. the root = tokens emitted this step
        path_tokens = jnp.take_along_axis(tree.tokens, result.path, axis=1)  # [B, depth + 1]
        # Emitted: the path without the root (emitted last step), then the bonus token.
        steps = jnp.arange(self.depth + 1)[None, :]
        shifted = jnp.concatenate([path_tokens[:, 1:], path_tokens[:, :1]], axis=1)
        new = jnp.where(steps < (num - 1)[:, None], shifted, result.bonus[:, None])
        active = ~state.done
        buffer, lengths, done = emit_tokens(state.tokens, state.lengths, state.limit, state.done, new, num, eos_id)
        commit = jnp.where(active, num, 0)
        hist = state.accepted_histogram.at[num].add(active.astype(jnp.int32))
        return state.replace(
            tokens=buffer, lengths=lengths, done=done, root=jnp.where(active, result.bonus, state.root),
            target_cache=target_cache.accept(result.path, commit),
            draft_caches=tuple(
                d.commit(c, result.path, commit, params=draft_params[i], target_hidden=target_hidden)
                if self._needs_hidden[i] else d.commit(c, result.path, commit)
                for i, (d, c) in enumerate(zip(self.drafters, draft_caches))),
            target_calls=state.target_calls + 1, accepted_histogram=hist)

    def step(self, target_params, draft_params, state: DecodeState, temperature, top_p, eos_id, top_k=0,
             min_p=0.0) -> DecodeState:
        """One draft -> verify -> accept round; pure."""
        rng, k_draft, k_verify = jax.random.split(state.rng, 3)
        tree, draft_caches = self.draft(draft_params, state.draft_caches, state.root, k_draft, temperature, top_p,
                                        top_k, min_p)
        logits, target_cache, *hidden = self.score(target_params, state.target_cache, tree,
                                                   return_hidden=any(self._needs_hidden))
        result = self.verify_tree(logits, tree, k_verify, temperature, top_p, top_k, min_p)
        accepted_depth = jnp.where(state.done, -1, result.num_accepted - 1)
        draft_caches = self.complete_draft_kv(draft_params, draft_caches, tree, accepted_depth)
        return self.accept(state.replace(rng=rng), tree, result, target_cache, draft_caches, eos_id,
                           draft_params=draft_params, target_hidden=hidden[0] if hidden else None)

    # -- the loop -------------------------------------------------------------------------------

    def init_state(self, target_params, draft_params, prompt, prompt_lengths, temperature, top_p, rng, eos_id,
                   *, max_new_tokens: int, top_k=0, min_p=0.0) -> DecodeState:
        """Prefills every model and emits the first token from the target's prompt logits; pure.

        Args:
          target_params, draft_params: the target's nnx state and the drafters' params.
          prompt: right-padded prompts, checked.  # [B, P] int32
          prompt_lengths: prompt lengths.  # [B] int32
          temperature, top_p, top_k, min_p: sampling warp (scalars).
          rng: PRNG key.
          eos_id: the ids that end a row, scalar or [n_eos]; -1 for none.
          max_new_tokens: static.

        Returns:
          the loop state before the first step.
        """
        batch, prompt_len = prompt.shape
        committed = prompt_len + max_new_tokens
        target = nnx.merge(self._target_def, target_params)
        target_cache = target.init_cache(batch, cache_len(target.config, committed, self.num_nodes))
        target_logits, target_cache, *hidden = target.prefill(prompt, prompt_lengths, target_cache,
                                                              return_hidden=any(self._needs_hidden),
                                                              hidden_layers=self._hidden_layers)
        draft_caches = [
            d.init(p, prompt, prompt_lengths, committed=committed, num_nodes=self.num_nodes,
                   **({"target_hidden": hidden[0]} if needs else {}))
            for d, p, needs in zip(self.drafters, draft_params, self._needs_hidden)]
        rng, k_first = jax.random.split(rng)
        root = first_token(target_logits, prompt_lengths, k_first, temperature, top_p, top_k, min_p)
        buffer = jnp.zeros((batch, prompt_len + max_new_tokens), jnp.int32).at[:, :prompt_len].set(prompt)
        limit = prompt_lengths + max_new_tokens
        buffer, lengths, done = emit_tokens(
            buffer, prompt_lengths, limit, jnp.zeros((batch,), bool), root[:, None], jnp.ones((batch,), jnp.int32),
            eos_id)
        return DecodeState(
            tokens=buffer, lengths=lengths, limit=limit, root=root, done=done, target_cache=target_cache,
            draft_caches=tuple(draft_caches), rng=rng, target_calls=jnp.array(1, jnp.int32),
            accepted_histogram=jnp.zeros((self.depth + 2,), jnp.int32))

    def run(self, target_params, draft_params, state: DecodeState, temperature, top_p, eos_id, step_limit,
            top_k=0, min_p=0.0) -> DecodeState:
        """Steps while some row is active and fewer than `step_limit` target passes ran; pure.

        A traced `step_limit` lets one compiled loop run generation in chunks (`spec.streaming`).
        """
        return jax.lax.while_loop(
            lambda s: ~jnp.all(s.done) & (s.target_calls < step_limit),
            lambda s: self.step(target_params, draft_params, s, temperature, top_p, eos_id, top_k, min_p),
            state)

    @staticmethod
    def result(state: DecodeState) -> GenerationResult:
        """The output and counters of a finished loop state."""
        hist = state.accepted_histogram
        mean = (hist * jnp.arange(hist.shape[0])).sum() / jnp.maximum(hist.sum(), 1)
        return GenerationResult(
            tokens=state.tokens, lengths=state.lengths,
            stats=GenerationStats(target_calls=state.target_calls, accepted_histogram=hist,
                                  mean_accepted_length=mean.astype(jnp.float32)))

    def generate(self, prompt, prompt_lengths, *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, rng=None, eos_id: int | Sequence[int] | None = None, top_k: int = 0,
                 min_p: float = 0.0, stream: Callable[[list[np.ndarray]], Any] | None = None,
                 stop_strings: Sequence[str] | None = None, tokenizer=None, decode=None,
                 chunk_steps: int = DEFAULT_CHUNK_STEPS) -> GenerationResult:
        """Generates up to `max_new_tokens` tokens per row.

        Args:
          prompt: right-padded prompts.  # [B, P] int
          prompt_lengths: prompt length per row, 1 .. P.  # [B] int
          max_new_tokens: tokens per row at most.
          temperature: 0 for greedy; > 0 needs verify="stochastic" and `rng`.
          top_p: nucleus sampling mass in (0, 1].
          rng: PRNG key or int seed.
          eos_id: a row stops after emitting this token, or any token of a sequence of them.
          top_k: > 0 samples among the k most likely tokens only (drafts and target alike).
          min_p: > 0 drops tokens less likely than min_p x the most likely one.
          stream: called between chunks with one int32 array per row of the tokens accepted since
            the last call (see `spec.streaming`).
          stop_strings: a row ends with the token that completes one of these; needs `tokenizer`
            (with a `decode` method) or `decode` (ids -> str).
          tokenizer, decode: how stop strings see the text.
          chunk_steps: steps of the compiled loop between host calls, with `stream` or `stop_strings`.

        Returns:
          GenerationResult: tokens [B, P + max_new_tokens], lengths [B], stats.

        Caches are sized for the call (see the module docstring), whatever the models' max_len.
        Call it outside `jax.jit`: it compiles its own loop, and a traced argument raises TypeError.
        """
        args = check_generate_args(
            prompt, prompt_lengths, vocab_size=self.vocab_size, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, rng=rng, eos_id=eos_id, top_k=top_k, min_p=min_p)
        streaming = check_stream_args(stream=stream, stop_strings=stop_strings, tokenizer=tokenizer, decode=decode,
                                      chunk_steps=chunk_steps)
        if self.verify == "greedy" and args.temperature > 0:
            raise ValueError(f'verify="greedy" reproduces greedy decoding only: {temperature=}; use "stochastic"')
        committed = args.prompt.shape[1] + args.max_new_tokens
        for i, drafter in enumerate(self.drafters):
            drafter.check_capacity(committed, self.num_nodes, f"draft {i}")
        params = (self._target_params, self._draft_params)
        eos, warp = jnp.asarray(args.eos_ids, jnp.int32), args.warp()
        temperature, top_p, top_k, min_p = warp["temperature"], warp["top_p"], warp["top_k"], warp["min_p"]

        def init():
            return self._init_jit(*params, args.prompt, args.prompt_lengths, temperature, top_p, args.rng, eos,
                                  max_new_tokens=args.max_new_tokens, top_k=top_k, min_p=min_p)

        def run(state, limit):
            return self._run_jit(*params, state, temperature, top_p, eos, limit, top_k, min_p)

        if streaming.chunked:
            state = run_chunked(init, run, prompt_lengths=np.asarray(args.prompt_lengths), args=streaming)
        else:  # an int32 array, as the chunks' limits are: a Python int would compile the loop apart
            state = run(init(), jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32))
        return self._result_jit(state)
