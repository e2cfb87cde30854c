"""A teacher's greedy continuations of training text, as extra training documents for a draft.

Speculative decoding asks the draft to predict what the target writes, and greedy target text
(its own repetitions and idioms) is not quite the corpus: training on it moves the draft there.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from fa2jax.data import Document
from fa2jax.model import Transformer
from fa2jax.tokenizer import Tokenizer


def teacher_continuations(teacher: Transformer, tokenizer: Tokenizer, docs: Sequence[Document], *, count: int,
                          prompt_len: int, new_tokens: int, batch: int, seed: int = 0) -> tuple[Document, ...]:
    """The teacher's greedy continuations of `count` windows of `prompt_len` tokens cut at random
    from `docs` (training documents only), each as a document of prompt + continuation.

    Args:
      teacher: the model that writes (e.g. `fa2jax.load_pretrained` of the target's run).
      tokenizer: the teacher's tokenizer.
      docs: documents to cut prompts from.
      count: continuations to write.
      prompt_len, new_tokens: tokens of each prompt and of each continuation.
      batch: continuations per generate call (the last call is padded to it: one compiled shape).
      seed: which windows are cut.

    Returns:
      `count` documents named teacher-continuation/<i>.
    """
    from spec import generate_incremental  # spec builds on fa2jax: imported where it is used

    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(docs))[:count]
    sources = [ids for ids in tokenizer.encode_batch([docs[i].text for i in picked]) if len(ids) >= prompt_len]
    if not sources:
        raise ValueError(f"no training document has {prompt_len=} tokens")
    windows = []
    for _ in range(count):  # several windows of one document when there are fewer documents than windows
        ids = sources[int(rng.integers(len(sources)))]
        start = int(rng.integers(0, len(ids) - prompt_len + 1))
        windows.append(list(ids[start: start + prompt_len]))
    out = []
    for first in range(0, len(windows), batch):
        chunk = windows[first: first + batch]
        chunk = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled shape
        result = generate_incremental(teacher, jnp.asarray(chunk, jnp.int32),
                                      jnp.full((batch,), prompt_len, jnp.int32), max_new_tokens=new_tokens,
                                      eos_id=tokenizer.eos_id)
        tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
        for row in range(min(batch, len(windows) - first)):
            ids = [int(t) for t in tokens[row, : lengths[row]]]
            # Logit rows past the tokenizer's vocabulary are never trained; an untrained teacher can
            # still pick one. Keep the text up to there (and up to end-of-text).
            end = next((i for i, t in enumerate(ids) if t >= tokenizer.vocab_size or t == tokenizer.eos_id), len(ids))
            out.append(Document(f"teacher-continuation/{first + row}", tokenizer.decode(ids[:end])))
    return tuple(out)
