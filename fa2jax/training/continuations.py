"""A teacher's own text as training data for a draft: greedy continuations of training text
(`teacher_continuations`) and sampled answers to chat prompts (`teacher_chat_responses`).

Speculative decoding asks the draft to predict what the target writes, and greedy target text
(its own repetitions and idioms) is not quite the corpus: training on it moves the draft there.
A chat model's answers, rendered with its chat template, are the text a chat draft sees.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

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


def teacher_chat_responses(teacher: Transformer, tokenizer, prompts: Sequence[str], *, samples: int = 1,
                           max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 1.0,
                           min_p: float = 0.0, batch: int = 32, seed: int = 0,
                           system: str | None = None) -> Iterator[list[dict]]:
    """The teacher's sampled answers to chat prompts, one batch of records at a time (a caller
    writes each batch as it comes, and may stop early).

    Each prompt is rendered with the tokenizer's chat template (user turn, then the assistant
    header) and answered `samples` times; rows stop at any of the tokenizer's eos ids.

    Args:
      teacher: the model that answers.
      tokenizer: its tokenizer, with a chat template (`HFTokenizer.apply_chat_template`).
      prompts: user messages.
      samples: answers per prompt (each drawn independently).
      max_new_tokens: longest answer.
      temperature, top_p, min_p: the sampling (`spec.sampling.warp_probs`). On a CPU prefer min_p
        to top_p: the nucleus sorts the vocabulary at every step.
      batch: rows per generate call (the last call is padded to it: one compiled shape).
      seed: the order of the prompts and the sampling's PRNG seed (batch i draws with seed + i).
      system: a system message before each prompt; None keeps the template's default.

    Yields:
      per batch, one record per answer: prompt_index, sample, prompt, prompt_ids, response_ids
      (without the final eos), stopped (True when an eos ended it, False when max_new_tokens
      did) and text (the rendered conversation: template, prompt and answer, eos not included).
    """
    from spec import generate_incremental

    if samples < 1 or batch < 1 or max_new_tokens < 1:
        raise ValueError(f"need positive {samples=}, {batch=} and {max_new_tokens=}")
    if not prompts:
        raise ValueError(f"no prompts: {len(prompts)=}")
    head = [{"role": "system", "content": system}] if system is not None else []
    rendered = [tokenizer.apply_chat_template(head + [{"role": "user", "content": p}]) for p in prompts]
    encoded = tokenizer.encode_batch(rendered, add_special_tokens=False)
    width = max(len(ids) for ids in encoded)
    # Every prompt once before any twice, each pass in its own shuffled order: a run stopped early
    # still covers the kinds of prompt of a file that lists them grouped.
    order = np.random.default_rng(seed)
    jobs = [(int(i), k) for k in range(samples) for i in order.permutation(len(prompts))]
    eos_ids = list(tokenizer.eos_ids)
    for number, first in enumerate(range(0, len(jobs), batch)):
        chunk = jobs[first: first + batch]
        rows = chunk + [chunk[-1]] * (batch - len(chunk))
        prompt = np.zeros((batch, width), np.int32)
        lengths = np.zeros((batch,), np.int32)
        for r, (i, _) in enumerate(rows):
            prompt[r, : len(encoded[i])] = encoded[i]
            lengths[r] = len(encoded[i])
        result = generate_incremental(teacher, jnp.asarray(prompt), jnp.asarray(lengths),
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      min_p=min_p, rng=seed + number, eos_id=eos_ids)
        tokens, ends = np.asarray(result.tokens), np.asarray(result.lengths)
        records = []
        for r, (i, k) in enumerate(chunk):
            answer = [int(t) for t in tokens[r, lengths[r]: ends[r]]]
            stopped = bool(answer) and answer[-1] in eos_ids
            answer = answer[:-1] if stopped else answer
            records.append({"prompt_index": i, "sample": k, "prompt": prompts[i], "prompt_ids": list(encoded[i]),
                            "response_ids": answer, "stopped": stopped,
                            "text": rendered[i] + tokenizer.decode(answer, skip_special_tokens=False)})
        yield records
