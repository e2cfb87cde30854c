"""A draft's starting token embedding taken from its teacher's, for drafts narrower than it.

A small draft with a large vocabulary spends most of its parameters, and most of a short
training run, on the embedding. The teacher's embedding already places tokens usefully; its
coordinates along the top `d_model` right singular vectors (a PCA without centring, so the
direction shared by all tokens, which carries their frequency, stays) are the best rank-d_model
linear summary of it and a better start than noise: rows of tokens the draft's corpus never
shows keep a sensible place. The draft shares nothing with the teacher at run time.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def projected_embedding(embedding, d_model: int, std: float = 0.02) -> np.ndarray:
    """The rows of `embedding` on its top `d_model` right singular vectors, scaled to `std`.

    Args:
      embedding: the teacher's token embedding.  # [V, D]
      d_model: the draft's width, at most D.
      std: standard deviation of the result's entries (the draft's usual initialisation scale, so
        its first logits are as flat as a random start's).

    Returns:
      float32 embedding.  # [V, d_model]
    """
    e = np.asarray(jnp.asarray(embedding, jnp.float32))
    if e.ndim != 2 or not 1 <= d_model <= e.shape[1]:
        raise ValueError(f"need a [V, D] embedding and 1 <= d_model <= D: {e.shape=} {d_model=}")
    # The Gram matrix is D x D: its eigenvectors are the right singular vectors without a V x D SVD.
    values, vectors = np.linalg.eigh(e.T.astype(np.float64) @ e)
    basis = vectors[:, np.argsort(values)[::-1][:d_model]]  # [D, d_model]
    projected = e @ basis.astype(np.float32)
    return (projected * (std / projected.std())).astype(np.float32)
