"""`KVCache`: the keys and values of every layer, with a committed length per batch row.

The cache is a pytree of arrays (no Python state), so prefill / decode / tree-verify / accept are
pure functions that run inside `jax.jit` and `lax.while_loop`. Lengths are data, not shapes: rows
of different lengths share one compiled program, and the maximum length is fixed at creation.

Slot layout of row b: [0, lengths[b]) holds the committed tokens; tree verification writes its N
speculative nodes to [lengths[b], lengths[b] + N) without committing them, and `accept` moves the
accepted root-to-leaf path down to [lengths[b], lengths[b] + num_accepted[b]) and commits it.
Slots at or beyond lengths[b] are never read as context, so stale values there are harmless.

Each layer has its own buffer, not a slice of one [L, ...] array: the attention kernels (custom
calls on a GPU) take a whole [B, S, K, D] operand, and a slice of a stacked buffer is a copy XLA
must make before every layer's attention (two device memcpys per layer and step, seen in the
speculative step's kernel census). A write updates its layer's buffer in place inside a loop.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value buffers and the committed length of each row.

    Attributes:
        layer_keys: L arrays [B, S, K, D], RoPE-rotated keys; S (the capacity) is static.
        layer_values: L arrays [B, S, K, D].
        lengths: [B] int32, number of committed tokens per row.
    """

    layer_keys: tuple[jax.Array, ...]
    layer_values: tuple[jax.Array, ...]
    lengths: jax.Array

    @classmethod
    def create(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> KVCache:
        """An empty cache (zeros, every length 0).

        Args:
            num_layers, batch, max_len, num_kv_heads, head_dim: L, B, S, K, D.
            dtype: storage dtype of keys and values.

        Returns:
            A KVCache with L key and L value buffers [B, S, K, D] and lengths [B] int32.
        """
        for name, value in (("num_layers", num_layers), ("batch", batch), ("max_len", max_len),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        shape = (batch, max_len, num_kv_heads, head_dim)
        return cls(layer_keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   layer_values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @classmethod
    def from_stacked(cls, keys: jax.Array, values: jax.Array, lengths: jax.Array) -> KVCache:
        """A cache from stacked buffers keys, values [L, B, S, K, D] and lengths [B] int32."""
        if keys.ndim != 5 or keys.shape != values.shape or lengths.shape != keys.shape[1:2]:
            raise ValueError(f"need keys and values [L, B, S, K, D] and lengths [B], got {keys.shape=} "
                             f"{values.shape=} {lengths.shape=}")
        return cls(layer_keys=tuple(keys), layer_values=tuple(values), lengths=jnp.asarray(lengths, jnp.int32))

    @property
    def keys(self) -> jax.Array:
        """Every layer's keys stacked, [L, B, S, K, D]: a copy, for inspection (layers read `layer_keys`)."""
        return jnp.stack(self.layer_keys)

    @property
    def values(self) -> jax.Array:
        """Every layer's values stacked, [L, B, S, K, D]: a copy, for inspection."""
        return jnp.stack(self.layer_values)

    @property
    def num_layers(self) -> int:
        return len(self.layer_keys)

    @property
    def max_len(self) -> int:
        """S, the static capacity of each row."""
        return self.layer_keys[0].shape[1]

    @property
    def batch(self) -> int:
        return self.layer_keys[0].shape[0]

    @property
    def dtype(self):
        return self.layer_keys[0].dtype

    def write(self, layer: int, keys: jax.Array, values: jax.Array, starts: jax.Array) -> KVCache:
        """Writes T new keys/values of one layer at slots starts[b] + [0, T) of each row b.

        A scatter into that layer's [B, S, K, D] buffer, which XLA updates in place. Slots past the
        capacity are dropped: the caller keeps lengths + T <= S.

        Args:
            layer: static layer index.
            keys, values: [B, T, K, D].
            starts: [B] int32 first slot per row.

        Returns:
            The cache with that layer updated; lengths unchanged.
        """
        B, T = keys.shape[:2]
        slots = starts.astype(jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
        rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))

        def put(buffers, new):
            updated = buffers[layer].at[rows, slots].set(new.astype(buffers[layer].dtype), mode="drop")
            return buffers[:layer] + (updated,) + buffers[layer + 1:]

        return self.replace(layer_keys=put(self.layer_keys, keys), layer_values=put(self.layer_values, values))

    def accept(self, path_indices: jax.Array, num_accepted: jax.Array) -> KVCache:
        """Commits the accepted path of a verified tree.

        Moves slot lengths[b] + path_indices[b, i] to slot lengths[b] + i for i < num_accepted[b], in
        every layer, then advances lengths by num_accepted. Path nodes are in root-first order and a
        tree lists parents before children, so path_indices[b, i] >= i: gathering every source before
        scattering makes the move safe even where a source and a destination overlap.

        Args:
            path_indices: [B, M] int32 tree-node indices, root first; entries past num_accepted[b]
                are ignored.
            num_accepted: [B] int32 in [0, M].

        Returns:
            The updated cache.
        """
        B, M = path_indices.shape
        if B != self.batch:
            raise ValueError(f"path_indices must be [B, M] with B={self.batch}, got {path_indices.shape=}")
        starts = self.lengths[:, None]  # [B, 1]
        steps = jnp.arange(M, dtype=jnp.int32)[None, :]  # [1, M]
        src = jnp.clip(starts + path_indices.astype(jnp.int32), 0, self.max_len - 1)  # [B, M]
        # Unaccepted entries scatter to slot S (out of range), which mode="drop" discards.
        dst = jnp.where(steps < num_accepted[:, None], starts + steps, self.max_len)  # [B, M]
        rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, M))

        def move(buffer):  # [B, S, K, D]
            return buffer.at[rows, dst].set(buffer[rows, src], mode="drop")

        return self.replace(layer_keys=tuple(map(move, self.layer_keys)),
                            layer_values=tuple(map(move, self.layer_values)),
                            lengths=self.lengths + num_accepted.astype(jnp.int32))
