"""`KVCache`: the keys and values of every layer, with a committed length per batch row.

The cache is a pytree of arrays (no Python state), so prefill / decode / tree-verify / accept are
pure functions that run inside `jax.jit` and `lax.while_loop`. Lengths are data, not shapes: rows
of different lengths share one compiled program, and the maximum length is fixed at creation.

Slot layout of row b: [0, lengths[b]) holds the committed tokens; tree verification writes its N
speculative nodes to [lengths[b], lengths[b] + N) without committing them, and `accept` moves the
accepted root-to-leaf path down to [lengths[b], lengths[b] + num_accepted[b]) and commits it.
Slots at or beyond lengths[b] are never read as context, so stale values there are harmless.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value buffers and the committed length of each row.

    Attributes:
        keys: [L, B, S, K, D] RoPE-rotated keys; S (the capacity) is static.
        values: [L, B, S, K, D].
        lengths: [B] int32, number of committed tokens per row.
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> KVCache:
        """An empty cache (zeros, every length 0).

        Args:
            num_layers, batch, max_len, num_kv_heads, head_dim: L, B, S, K, D.
            dtype: storage dtype of keys and values.

        Returns:
            A KVCache with keys/values [L, B, S, K, D] and lengths [B] int32.
        """
        for name, value in (("num_layers", num_layers), ("batch", batch), ("max_len", max_len),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        """S, the static capacity of each row."""
        return self.keys.shape[2]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def write(self, layer: int, keys: jax.Array, values: jax.Array, starts: jax.Array) -> KVCache:
        """Writes T new keys/values of one layer at slots starts[b] + [0, T) of each row b.

        A scatter into the whole [L, B, S, K, D] buffer (not a slice-update-restack), so XLA updates
        it in place. Slots past the capacity are dropped: the caller keeps lengths + T <= S.

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
        new_keys = self.keys.at[layer, rows, slots].set(keys.astype(self.keys.dtype), mode="drop")
        new_values = self.values.at[layer, rows, slots].set(values.astype(self.values.dtype), mode="drop")
        return self.replace(keys=new_keys, values=new_values)

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

        def move(buffer):  # [L, B, S, K, D]
            moved = buffer[:, rows, src]  # [L, B, M, K, D]
            return buffer.at[:, rows, dst].set(moved, mode="drop")

        return self.replace(keys=move(self.keys), values=move(self.values),
                            lengths=self.lengths + num_accepted.astype(jnp.int32))
