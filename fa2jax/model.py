"""`Transformer`: a Llama-style decoder (RMSNorm, RoPE, gated MLP, GQA) with KV-cache and tree-verify calls.

The open-weight families are switches of `TransformerConfig` on this one decoder (biases, qk-norm,
softcaps, per-layer sliding windows, (1 + w) norms, GeGLU, post-norms, embedding scale); the
Hugging Face tensor names of each family are mapped in `fa2jax.hf_families`.

Calls, all pure once split with `nnx.split` (lengths are data, so none recompiles per length):
    model(tokens, segment_ids, positions)        training forward over packed sequences -> logits
    model.init_cache(batch, max_len)             an empty `KVCache`
    model.prefill(tokens, lengths, cache)        right-padded prompts -> logits, cache
    model.decode(tokens, cache)                  T new tokens per row -> logits, cache (lengths += T)
    model.score_tree(tokens, tree_mask, cache)   N speculative tree nodes -> logits (lengths unchanged)
Each also returns the final hidden state (the vector the LM head reads, after the final norm) last
when called with `return_hidden=True`: what a feature-level draft (`spec.feature_draft`) reads;
`embed_tokens` and `head_logits` are the two ends of the model such a draft shares. With
`hidden_layers=(i, j, ...)` as well, that array is wider: the outputs of decoder layers i, j, ...
(their residual streams, 0-based), then the final hidden state, concatenated on the last axis
(EAGLE-3's low, middle and high features for a head that fuses them).
and `cache.accept(path_indices, num_accepted)` commits a verified path (see `fa2jax.kv_cache`).
With `config.invariant_rows` = R, decode and score_tree both run as R-row tree verifications, so
a token's logits do not depend on which of the two computed it (see `TransformerConfig`).

Logits are float32 whatever the compute dtype: speculative acceptance compares probabilities. With
`config.tokenizer_vocab_size` set (a vocabulary padded past the tokenizer's), the cached calls give
the padding rows logit -inf, so no sampler picks them.

Misuse (a token id outside the vocabulary, prefill lengths outside [0, T], a batch other than the
cache's, a call that would write past the cache's end) raises a ValueError at the call when the
values are concrete; inside `jit` the data-dependent checks run under `fa2jax.checked` (checkify).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import checkify

from fa2jax import checking
from fa2jax._deprecation import warn_renamed
from fa2jax.config import TransformerConfig
from fa2jax.kv_cache import KVCache
from fa2jax.layers import GatedMLP, MultiHeadAttention, RMSNorm, segment_positions
from fa2jax.sharding import ACTIVATION_AXES, constrain, context_shards
from pallas_kernels.fa2 import ring
from pallas_kernels.tree import arguments as tree_arguments


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `config.post_norms` each sublayer's output is normalised again before its residual add
    (Gemma 2/3: x + post_norm(attn(norm(x)))). Layer `layer` takes its window and RoPE from the config.
    """

    def __init__(self, config: TransformerConfig, layer: int, *, rngs: nnx.Rngs):
        norm = dict(epsilon=config.norm_eps, offset=config.norm_offset, dtype=config.dtype,
                    param_dtype=config.param_dtype)
        window = config.layer_window(layer)
        rope_theta, rope_scaling = config.layer_rope(layer)
        self.attn_norm = RMSNorm(config.d_model, **norm)
        self.attn = MultiHeadAttention(
            config.num_heads, config.d_model, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            dtype=config.dtype, param_dtype=config.param_dtype, use_bias=config.qkv_bias, out_bias=config.out_bias,
            is_causal=True, window_size=(window - 1, 0) if window else (-1, -1), softcap=config.attn_softcap,
            scale=config.attn_scale, rope_theta=rope_theta, rope_scaling=rope_scaling, qk_norm=config.qk_norm,
            norm_epsilon=config.norm_eps, norm_offset=config.norm_offset, implementation=config.attention_impl,
            fused_qkv=config.fused_projections, rngs=rngs)
        self.attn_post_norm = RMSNorm(config.d_model, **norm) if config.post_norms else nnx.data(None)
        self.mlp_norm = RMSNorm(config.d_model, **norm)
        self.mlp = GatedMLP(config.d_model, config.d_ff, activation=config.mlp_activation, use_bias=config.mlp_bias,
                            dtype=config.dtype, param_dtype=config.param_dtype, fused=config.fused_projections,
                            rngs=rngs)
        self.mlp_post_norm = RMSNorm(config.d_model, **norm) if config.post_norms else nnx.data(None)

    def _residuals(self, x, attn):
        """The attention output `attn` added to x, then the MLP sublayer: [B, T, d_model] -> the same."""
        if self.attn_post_norm is not None:
            attn = self.attn_post_norm(attn)
        x = x + attn
        mlp = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            mlp = self.mlp_post_norm(mlp)
        return x + mlp

    def __call__(self, x, *, segment_ids, positions, zigzag: bool = False):  # x [B, T, d_model]
        return self._residuals(x, self.attn(self.attn_norm(x), segment_ids=segment_ids, positions=positions,
                                            zigzag=zigzag))

    def prefill(self, x, cache: KVCache, layer: int):
        attn, cache = self.attn.prefill(self.attn_norm(x), cache, layer)
        return self._residuals(x, attn), cache

    def extend(self, x, positions, cache: KVCache, layer: int, tree_mask=None, batch_invariant: bool = False):
        attn, cache = self.attn.extend(self.attn_norm(x), positions, cache, layer, tree_mask, batch_invariant)
        return self._residuals(x, attn), cache


class Transformer(nnx.Module):
    """Decoder-only language model; see the module docstring for its calls.

    Parameters: `embed` (nnx.Embed [V, d_model]), `layers[i]` (`Block`: attn_norm, attn.{query, key,
    value, out} (with q_norm, k_norm under config.qk_norm), mlp_norm, mlp.{gate, up, down}, and
    attn_post_norm, mlp_post_norm under config.post_norms), `final_norm`, and `lm_head` [d_model, V]
    unless embeddings are tied. Under config.fused_projections attn.qkv replaces attn.{query, key,
    value} and mlp.gate_up replaces mlp.{gate, up} (see `fa2jax.fuse_projections`).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=config.dtype,
                               param_dtype=config.param_dtype,
                               embedding_init=nnx.initializers.normal(stddev=0.02), rngs=rngs)
        self.layers = nnx.List([Block(config, layer, rngs=rngs) for layer in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, epsilon=config.norm_eps, offset=config.norm_offset,
                                  dtype=config.dtype, param_dtype=config.param_dtype)
        if config.tie_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = nnx.Linear(config.d_model, config.vocab_size, use_bias=False, dtype=config.dtype,
                                      param_dtype=config.param_dtype, rngs=rngs)

    def _check_tokens(self, tokens: jax.Array, name: str = "tokens", cache: KVCache | None = None,
                      prompt_lengths=None) -> jax.Array | None:
        """Shape and dtype, the cache's batch, and ids in [0, V) (see `fa2jax.checking`), only within
        the prompts when `prompt_lengths` are given: those are checked too and returned as int32."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer [B, T] array, got {tokens.shape=} {tokens.dtype=}")
        if cache is not None:
            checking.check_batch(name, tokens.shape[0], cache.batch)
        valid = None
        if prompt_lengths is not None:
            prompt_lengths = _check_prefill_lengths(prompt_lengths, tokens.shape)
            valid = jnp.arange(tokens.shape[1])[None, :] < prompt_lengths[:, None]  # [B, T]
        checking.check_token_ids(tokens, self.config.vocab_size, name, valid)
        return prompt_lengths

    def _embed(self, tokens: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, d_model] in the compute dtype."""
        x = self.embed(tokens)
        if self.config.scale_embeddings:  # Gemma rounds sqrt(d_model) to the dtype first (55.43 -> 55.5 in bf16)
            x = x * jnp.asarray(self.config.d_model ** 0.5, x.dtype)
        return x

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """The input embeddings: [B, T] ids -> [B, T, d_model] in the compute dtype (ids unchecked)."""
        return self._embed(tokens)

    def head_logits(self, x: jax.Array, mask_padding: bool = True) -> jax.Array:
        """Final hidden states (after the final norm) [B, T, d_model] -> float32 logits [B, T, V],
        accumulated in float32 (soft-capped when `config.logit_softcap`); the vocabulary's padding
        rows (`config.tokenizer_vocab_size` on) at -inf when `mask_padding`."""
        if self.lm_head is None:
            weight = self.embed.embedding[...].astype(x.dtype)  # [V, d_model]
            logits = jnp.einsum("btd,vd->btv", x, weight, preferred_element_type=jnp.float32)
        else:
            weight = self.lm_head.kernel[...].astype(x.dtype)  # [d_model, V]
            logits = jnp.einsum("btd,dv->btv", x, weight, preferred_element_type=jnp.float32)
        cap = self.config.logit_softcap
        if cap:
            logits = cap * jnp.tanh(logits / cap)
        used, vocab = self.config.tokenizer_vocab_size, self.config.vocab_size
        if mask_padding and used is not None and used < vocab:
            logits = jnp.where(jnp.arange(vocab) < used, logits, -jnp.inf)
        return logits

    def _check_hidden_layers(self, hidden_layers, return_hidden: bool) -> tuple[int, ...]:
        """`hidden_layers` as a tuple after `check_inner_layers`, only with `return_hidden`."""
        layers = check_inner_layers(hidden_layers, self.config.num_layers)
        if layers and not return_hidden:
            raise ValueError(f"hidden_layers={layers} needs return_hidden=True")
        return layers

    def _outputs(self, x: jax.Array, return_hidden: bool, cache: KVCache | None = None, mask_padding: bool = True,
                 taps: list[jax.Array] = ()):
        """What a call returns for residual stream x [B, T, d_model]: logits, then `cache` when
        given, then the final hidden states [B, T, d_model] when `return_hidden`, after the
        residual streams `taps` of the layers asked for ([B, T, (len(taps) + 1) * d_model])."""
        hidden = self.final_norm(x)
        out = (self.head_logits(hidden, mask_padding),) + (() if cache is None else (cache,))
        if return_hidden:
            wide = jnp.concatenate([*(t.astype(hidden.dtype) for t in taps), hidden], axis=-1) if taps else hidden
            return out + (wide,)
        return out if cache is not None else out[0]

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int
        segment_ids: jax.Array | None = None,  # [B, T] int
        positions: jax.Array | None = None,  # [B, T] int
        *,
        zigzag: bool = False,
        return_hidden: bool = False,
        hidden_layers: tuple[int, ...] = (),
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Training forward: causal attention within each packed segment.

        Under a mesh with a "context" axis of n > 1 devices (context parallelism, `fa2jax.sharding`)
        the sequence is split over it and attention runs as ring attention, which balances causal
        work by the zig-zag token order (`pallas_kernels.fa2.ring.zigzag`; T % 2n == 0).

        Args:
            tokens: [B, T] token ids.
            segment_ids: [B, T]; a token attends only to earlier tokens of the same id (id 0 may be
                padding: it is a segment like any other, so mask it out of the loss).
            positions: [B, T] RoPE positions; by default each segment counts from 0 (or 0..T-1).
            zigzag: the three arrays are already in the zig-zag order of the context axis (then
                `positions` are required: segment starts cannot be found in that order), and the
                logits come back in it. The training step does this, with its targets permuted
                alike, so no logits move between devices. Without it, under a context axis the
                call permutes its inputs and restores the token order of the last hidden states.
            return_hidden: also return the final hidden states [B, T, d_model] (after the final norm).
            hidden_layers: with `return_hidden`, also these layers' outputs, before the final hidden
                states on the last axis ([B, T, (len(hidden_layers) + 1) * d_model]).

        Returns:
            logits [B, T, V] float32 (and the hidden states). The vocabulary's padding rows are not
            masked here: losses take logs of probabilities (0 * log 0 would be NaN).
        """
        self._check_tokens(tokens)
        hidden_layers = self._check_hidden_layers(hidden_layers, return_hidden)
        if zigzag and positions is None:
            raise ValueError("zigzag=True needs the positions of the zig-zag order: segment starts cannot be "
                             "found once the tokens are permuted")
        if positions is None:
            if segment_ids is None:
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            else:
                positions = segment_positions(segment_ids)
        shards = context_shards()
        permute = shards > 1 and not zigzag
        if permute:
            # Once here, not in every layer: everything but attention works token by token, and each
            # token carries its own position and segment id, so only ring attention sees the order.
            # Permuting around each attention would move the activations between devices twice a layer.
            tokens, positions = ring.zigzag(tokens, shards), ring.zigzag(positions, shards)
            segment_ids = None if segment_ids is None else ring.zigzag(segment_ids, shards)
        # Under a mesh the residual stream stays split by batch rows (and by positions over a context
        # axis) between blocks (a no-op without one): XLA then gathers FSDP-split weights rather
        # than moving activations.
        x = constrain(self._embed(tokens), ACTIVATION_AXES)
        taps = []
        for layer, block in enumerate(self.layers):
            x = constrain(block(x, segment_ids=segment_ids, positions=positions, zigzag=shards > 1),
                          ACTIVATION_AXES)
            if layer in hidden_layers:
                taps.append(x)
        if permute:
            x = constrain(ring.unzigzag(x, shards), ACTIVATION_AXES)
            taps = [constrain(ring.unzigzag(t, shards), ACTIVATION_AXES) for t in taps]
        return self._outputs(x, return_hidden, mask_padding=False, taps=taps)

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        """An empty KV cache for `batch` rows of `max_len` (default config.max_len) tokens.

        Args:
            dtype: storage dtype, default the compute dtype.
        """
        c = self.config
        return KVCache.create(c.num_layers, batch, max_len or c.max_len, c.num_kv_heads, c.head_dim,
                              dtype or c.dtype)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache, *, return_hidden: bool = False,
                hidden_layers: tuple[int, ...] = ()
                ) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, jax.Array]:
        """Runs right-padded prompts from position 0 and fills the cache.

        Args:
            tokens: [B, T]; row b's prompt is tokens[b, :lengths[b]], the rest is padding (any value).
            lengths: [B] int32 prompt lengths, in [0, T].
            cache: a cache of B rows with T <= max_len; every row is overwritten from slot 0.

        Returns:
            (logits [B, T, V] float32, cache with lengths = lengths), then the final hidden states
            [B, T, d_model] with `return_hidden` (after `hidden_layers`' outputs, as `__call__`).
            Logits at padding are meaningless.

        Raises:
            ValueError: wrong shapes, a batch other than the cache's, or (concrete values) lengths
                outside [0, T] or prompt tokens outside [0, V); under `fa2jax.checked` the last two
                also inside `jit`.
        """
        lengths = self._check_tokens(tokens, cache=cache, prompt_lengths=lengths)
        hidden_layers = self._check_hidden_layers(hidden_layers, return_hidden)
        if tokens.shape[1] > cache.max_len:
            raise ValueError(f"prompt longer than the cache: {tokens.shape=} vs {cache.max_len=}")
        x, taps = self._embed(tokens), []
        for layer, block in enumerate(self.layers):
            x, cache = block.prefill(x, cache, layer)
            if layer in hidden_layers:
                taps.append(x)
        return self._outputs(x, return_hidden, cache=cache.replace(lengths=lengths), taps=taps)

    def decode(self, tokens: jax.Array, cache: KVCache, *, return_hidden: bool = False,
               hidden_layers: tuple[int, ...] = ()
               ) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, jax.Array]:
        """Appends T tokens per row at positions lengths .. lengths + T - 1 (causal among themselves).

        Args:
            tokens: [B, T]; the caller keeps lengths + T <= max_len (slots past it are dropped).
            cache: the committed context.

        Returns:
            (logits [B, T, V] float32, cache with lengths += T), then the final hidden states
            [B, T, d_model] with `return_hidden` (after `hidden_layers`' outputs, as `__call__`).

        Raises:
            ValueError: a batch other than the cache's, or (concrete values) token ids outside [0, V) or
                lengths + T > max_len (+ R with invariant_rows = R); under `fa2jax.checked` the last two
                also inside `jit`.
        """
        self._check_tokens(tokens, cache=cache)
        hidden_layers = self._check_hidden_layers(hidden_layers, return_hidden)
        T = tokens.shape[1]
        checking.check_cache_room(cache.lengths, max(T, self.config.invariant_rows), cache.max_len, "decoding")
        if self.config.invariant_rows:  # the same computation as verifying a chain of T nodes
            logits, cache, *hidden = self.score_tree(tokens, np.tril(np.ones((T, T), bool)), cache,
                                                     return_hidden=return_hidden, hidden_layers=hidden_layers)
            return (logits, cache.replace(lengths=cache.lengths + T), *hidden)
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
        x, taps = self._embed(tokens), []
        for layer, block in enumerate(self.layers):
            x, cache = block.extend(x, positions, cache, layer)
            if layer in hidden_layers:
                taps.append(x)
        return self._outputs(x, return_hidden, cache=cache.replace(lengths=cache.lengths + T), taps=taps)

    def score_tree(self, tokens: jax.Array, tree_mask: jax.Array, cache: KVCache, *, return_hidden: bool = False,
                   hidden_layers: tuple[int, ...] = ()
                   ) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, jax.Array]:
        """Scores N speculative tree nodes in one pass: the logits of every node's next token.

        Node i sits at RoPE position lengths[b] + depth(i), depth(i) = tree_mask[i].sum() - 1, and its K/V
        go to slot lengths[b] + i; lengths are not advanced (`cache.accept` commits the accepted path).

        Args:
            tokens: [B, N] node tokens, parents before children.
            tree_mask: bool [N, N] or [B, N, N]; tree_mask[i, j] iff j is i or an ancestor of i.
            cache: the committed context; the caller keeps lengths + N <= max_len (lengths + R with
                config.invariant_rows = R, which must be >= N).

        Returns:
            (logits [B, N, V] float32, cache with the nodes' K/V written), then the final hidden
            states [B, N, d_model] with `return_hidden` (after `hidden_layers`' outputs, as `__call__`).

        Raises:
            ValueError: a batch other than the cache's, or (concrete values) token ids outside [0, V), a
                mask that is not a tree, or lengths + N (or R) > max_len; under `fa2jax.checked` the
                last three also inside `jit`.
        """
        self._check_tokens(tokens, cache=cache)
        hidden_layers = self._check_hidden_layers(hidden_layers, return_hidden)
        B, N = tokens.shape
        if not isinstance(tree_mask, np.ndarray):  # a NumPy mask stays one: a trace-time constant
            tree_mask = jnp.asarray(tree_mask)
        if tree_mask.shape not in ((N, N), (B, N, N)) or tree_mask.dtype != jnp.bool_:
            raise ValueError(f"tree_mask must be bool [N, N] or [B, N, N] with {B=} {N=}, got "
                             f"{tree_mask.shape=} {tree_mask.dtype=}")
        concrete_mask = checking.concrete(tree_mask)
        if concrete_mask is not None:
            tree_arguments.check_tree_closure(concrete_mask)
        else:
            tree_arguments.check_tree_mask(tree_mask, check=checkify.debug_check)
        rows = self.config.invariant_rows
        checking.check_cache_room(cache.lengths, max(N, rows), cache.max_len, "scoring the tree")
        if rows:
            if N > rows:
                raise ValueError(f"{N=} tokens in one call exceed config.invariant_rows={rows}")
            tokens = jnp.pad(tokens, ((0, 0), (0, rows - N)))
            tree_mask = _pad_tree_mask(tree_mask, rows)
        depth = jnp.broadcast_to(tree_mask.sum(-1, dtype=jnp.int32) - 1, tokens.shape)  # [B, N or R]
        positions = cache.lengths[:, None] + depth
        x, taps = self._embed(tokens), []
        for layer, block in enumerate(self.layers):
            x, cache = block.extend(x, positions, cache, layer, tree_mask, batch_invariant=rows > 0)
            if layer in hidden_layers:
                taps.append(x)
        # The head runs over all R rows with invariant_rows, as in decode: the same matmul shapes.
        logits, cache, *hidden = self._outputs(x, return_hidden, cache=cache, taps=taps)
        return (logits[:, :N], cache, *(h[:, :N] for h in hidden))

    def verify_tree(self, tokens: jax.Array, tree_mask: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Deprecated name of `score_tree` (`SpeculativeDecoder.verify_tree` is the accept/reject step)."""
        warn_renamed("Transformer.verify_tree", "Transformer.score_tree")
        return self.score_tree(tokens, tree_mask, cache)


def check_inner_layers(layers, num_layers: int | None = None, name: str = "hidden_layers") -> tuple[int, ...]:
    """`layers` as a tuple of ints after checking them: strictly increasing decoder-layer indices
    >= 0 and, with `num_layers`, below its last layer (whose output is the final hidden state,
    always returned). Raises a ValueError naming `name` and the value otherwise."""
    values = tuple(layers) if isinstance(layers, (tuple, list)) else None
    last = None if num_layers is None else num_layers - 1
    if (values is None
            or any(not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0 or (last is not None and i >= last)
                   for i in values)
            or any(a >= b for a, b in zip(values, values[1:]))):
        bound = "" if last is None else (f" below {last} (num_layers={num_layers}; the last layer's output is the "
                                          f"final hidden state, always returned)")
        raise ValueError(f"{name} must be strictly increasing layer indices >= 0{bound}, got {name}={layers!r}")
    return tuple(int(i) for i in values)


def replace_config(model: Transformer, **changes) -> Transformer:
    """The same parameter arrays (not copied) under `model.config.replace(**changes)`.

    Only for fields that keep every parameter's shape (max_len, invariant_rows, attention_impl,
    dtype, ...): the arrays are reused as they are.
    """
    config = model.config.replace(**changes)
    twin = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    nnx.update(twin, nnx.state(model))
    return twin


def with_invariant_rows(model: Transformer, rows: int) -> Transformer:
    """The same parameter arrays (not copied) under `config.invariant_rows = rows` (0: plain calls)."""
    return replace_config(model, invariant_rows=rows)


def with_min_len(model: Transformer, min_len: int) -> Transformer:
    """`model`, with `config.max_len` raised to `min_len` when it is shorter (the same arrays).

    RoPE has no learned length, so a model trained on short rows can hold longer caches; the
    generate functions check `max_len` against prompt + new tokens + tree nodes.
    """
    return model if model.config.max_len >= min_len else replace_config(model, max_len=min_len)


def _check_prefill_lengths(lengths, tokens_shape: tuple[int, ...]) -> jax.Array:
    """lengths as int32 [B] after checking them against tokens [B, T] (values: see `fa2jax.checking`)."""
    lengths = lengths if isinstance(lengths, (np.ndarray, jax.Array)) else np.asarray(lengths)
    B, T = tokens_shape
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer [B] array with B={B} (tokens' batch), got {lengths.shape=} "
                         f"{lengths.dtype=}")
    values = checking.concrete(lengths)
    if values is not None:
        bad = (values < 0) | (values > T)
        if bad.any():
            b = int(np.argmax(bad))
            raise ValueError(f"prefill lengths must lie in [0, T={T}] (tokens.shape[1]), got lengths[{b}]="
                             f"{int(values[b])} (lengths={values.tolist()})")
    else:
        checkify.debug_check(jnp.all((lengths >= 0) & (lengths <= T)),
                             f"prefill lengths must lie in [0, T={T}] (tokens.shape[1]), got {{lengths}}",
                             lengths=lengths)
    return jnp.asarray(lengths, jnp.int32)


def _pad_tree_mask(tree_mask, rows: int):
    """[..., N, N] -> [..., rows, rows]: the padding nodes see only themselves (NumPy stays NumPy)."""
    xp = np if isinstance(tree_mask, np.ndarray) else jnp
    extra = rows - tree_mask.shape[-1]
    padded = xp.pad(tree_mask, [(0, 0)] * (tree_mask.ndim - 2) + [(0, extra), (0, extra)])
    return padded | xp.eye(rows, dtype=bool)
