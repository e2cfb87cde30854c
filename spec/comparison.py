"""Speculative vs incremental decoding of the same prompts: timing, the report, the cost model.

`compare` runs `generate_incremental` and `SpeculativeDecoder.generate` on the same prompts (each
compiled by a first run, timed on a second) and returns a `Report`; `CostModel` predicts the
speedup from separately timed pieces (SpecInfer's analysis):
    speedup ~= tokens per step x t_decode(target) / (draft passes x t_draft + t_verify(target)).
`encode_prompts` and `decode_text` turn text into the padded prompt batch and ids back into text.
Used by examples/speculative_generate.py and examples/demo.py.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fa2jax import Transformer
from spec.decoder import SpeculativeDecoder
from spec.drafters import as_drafter
from spec.generation import call_model
from spec.incremental import generate_incremental
from spec.trees import MergedTree


def draft_passes(tree) -> list[int]:
    """Tree passes each draft runs per step at most: one per level it fills, plus the pass that
    fixes the deepest nodes' K/V, which runs only in steps that accept one of them (`spec.draft`)."""
    if isinstance(tree, MergedTree):
        return [t.depth + 1 for t in tree.trees]
    return [tree.depth + 1]


def mean_draft_passes(decoder: SpeculativeDecoder, histogram) -> tuple[float, ...]:
    """Per draft, tree passes per step over the steps counted in `histogram`: one per level it
    fills, plus the K/V fix-up pass in the steps whose accepted path went deeper than the draft's
    K/V were exact (`SpeculativeDecoder.complete_draft_kv`).

    Args:
      decoder: the decoder that ran.
      histogram: its `accepted_histogram` (summed over runs); entry k counts steps that emitted k
        tokens, i.e. accepted a path down to depth k - 1.

    Exact for batch 1; with more rows a step fixes up when any row needs it, so this is a lower bound.
    """
    hist = np.asarray(histogram, np.float64)
    deepest = np.arange(hist.size) - 1
    steps = max(hist.sum(), 1.0)
    return tuple(most - 1 + hist[deepest > exact].sum() / steps
                 for most, exact in zip(draft_passes(decoder.tree), decoder.exact_kv_depths))


def timed(fn) -> tuple[object, float]:
    """(host result, seconds) of fn()'s second run: the first one compiles."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return jax.device_get(out), time.perf_counter() - start


def seconds_per_call(model: Transformer, method: str, tokens, *args, cache_len: int, context: int,
                     reps: int = 10) -> float:
    """Mean seconds of one jitted `model.method(tokens, *args, cache)` with `context` tokens cached."""
    graphdef, params = nnx.split(model)
    batch = tokens.shape[0]
    cache = model.init_cache(batch, cache_len)
    cache = cache.replace(lengths=cache.lengths + context)
    fn = jax.jit(lambda p, c: call_model(graphdef, p, method, tokens, *args, c)[0])
    jax.block_until_ready(fn(params, cache))
    start = time.perf_counter()
    for _ in range(reps):  # dispatch is asynchronous, so the calls queue back to back
        out = fn(params, cache)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def seconds_per_proposal(draft, tokens, tree_mask, *, context: int, reps: int = 10) -> float:
    """Mean seconds of one jitted `propose` pass of any draft (a `Transformer` or a `spec.Drafter`)
    over the N nodes of `tokens` [B, N] under `tree_mask` [N, N], after `context` committed tokens.

    Goes through the protocol: `init` reads a prompt of `context` tokens (untimed), so a drafter's
    state is whatever it keeps. A drafter with `needs_target_hidden` reads zeros as the target's
    features (its config's width and dtype): a pass costs the same whatever their values.
    """
    drafter = as_drafter(draft)
    batch, n = tokens.shape
    prompt = jnp.ones((batch, context), jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    extra = {}
    if getattr(drafter, "needs_target_hidden", False):
        width = getattr(drafter.config, "target_width", drafter.config.d_model)
        extra["target_hidden"] = jnp.zeros((batch, context, width), drafter.config.layer.dtype)
    state = jax.jit(lambda p: drafter.init(p, prompt, lengths, committed=context + n, num_nodes=n, **extra))(
        drafter.params)
    propose = jax.jit(lambda p, s: drafter.propose(p, s, tokens, tree_mask)[0])
    jax.block_until_ready(propose(drafter.params, state))
    start = time.perf_counter()
    for _ in range(reps):  # dispatch is asynchronous, so the calls queue back to back
        out = propose(drafter.params, state)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


@dataclasses.dataclass(frozen=True)
class CostModel:
    """speedup ~= tokens per step x t_decode / (sum over drafts of passes x t_draft + t_verify)."""

    t_decode: float  # seconds of one target decode step (one token per row)
    t_verify: float  # seconds of one target pass over the N tree nodes
    t_draft: tuple[float, ...]  # per draft, seconds of one pass over the N tree nodes
    passes: tuple[int, ...]  # per draft, passes per step

    def speedup(self, tokens_per_step: float) -> float:
        step = sum(p * t for p, t in zip(self.passes, self.t_draft)) + self.t_verify
        return tokens_per_step * self.t_decode / step


def measure_cost_model(target, decoder: SpeculativeDecoder, batch: int, context: int) -> CostModel:
    """Times the pieces of one speculative step at a context of `context` cached tokens: the
    target's passes, and each of the decoder's drafters' `propose` (a feature head's pass
    included, with the target's embedding and LM head it borrows)."""
    n = decoder.num_nodes
    nodes = jnp.zeros((batch, n), jnp.int32)
    # A chain mask: the shape of a tree pass is what costs, not which nodes are ancestors.
    mask = jnp.tril(jnp.ones((n, n), bool))
    cache_len = context + n
    return CostModel(
        t_decode=seconds_per_call(target, "decode", nodes[:, :1], cache_len=cache_len, context=context),
        t_verify=seconds_per_call(target, "score_tree", nodes, mask, cache_len=cache_len, context=context),
        t_draft=tuple(seconds_per_proposal(d, nodes, mask, context=context) for d in decoder.drafters),
        passes=tuple(draft_passes(decoder.tree)))


@dataclasses.dataclass(frozen=True)
class Report:
    """One incremental vs speculative comparison on the same prompts."""

    verify: str
    tree: object
    num_drafts: int
    prompt_lengths: np.ndarray  # [B]
    tokens: np.ndarray  # [B, P + max_new_tokens] speculative output
    lengths: np.ndarray  # [B]
    incremental_tokens: np.ndarray  # [B, P + max_new_tokens]
    incremental_lengths: np.ndarray  # [B]
    seconds: tuple[float, float]  # incremental, speculative
    new_tokens: tuple[int, int]  # incremental, speculative
    target_calls: tuple[int, int]  # incremental, speculative; prefill included
    histogram: np.ndarray  # histogram[k]: (row, step) pairs that emitted k tokens
    mean_accepted_length: float  # tokens emitted per speculative step
    cost: CostModel

    @property
    def tokens_per_s(self) -> tuple[float, float]:
        return tuple(n / s for n, s in zip(self.new_tokens, self.seconds))

    @property
    def speedup(self) -> float:
        return self.tokens_per_s[1] / self.tokens_per_s[0]

    @property
    def identical(self) -> bool | None:
        """Greedy: the speculative tokens equal the incremental ones. Sampling: None (the two draw
        different random numbers, only their distributions agree)."""
        if self.verify != "greedy":
            return None
        return bool(np.array_equal(self.lengths, self.incremental_lengths)
                    and np.array_equal(self.tokens, self.incremental_tokens))

    def continuations(self) -> list[np.ndarray]:
        return [self.tokens[b, p:n] for b, (p, n) in enumerate(zip(self.prompt_lengths, self.lengths))]

    @property
    def title(self) -> str:
        return f"{self.verify} verification, {self.num_drafts} draft(s), {self.tree}"


def encode_prompts(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt ids [B, P] int32 and lengths [B] of `texts`."""
    ids = [tokenizer.encode(t) for t in texts]
    if any(len(x) == 0 for x in ids):
        raise ValueError(f"every prompt must encode to at least one token: {texts=}")
    return pad_prompts(ids)


def pad_prompts(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt ids [B, P] int32 and lengths [B] of token id lists."""
    if any(len(x) == 0 for x in ids):
        raise ValueError(f"every prompt needs at least one token: {[len(x) for x in ids]=}")
    lengths = np.array([len(x) for x in ids], np.int32)
    prompt = np.zeros((len(ids), lengths.max()), np.int32)
    for row, x in enumerate(ids):
        prompt[row, : len(x)] = x
    return prompt, lengths


def decode_text(tokenizer, ids) -> str:
    """Text of `ids`; ids past the tokenizer's vocabulary (a model's may be rounded up past it, and
    an untrained model may emit them) are dropped and counted."""
    size = getattr(tokenizer, "vocab_size", None)
    kept = [int(i) for i in ids if size is None or i < size]
    dropped = len(ids) - len(kept)
    return tokenizer.decode(kept) + (f" [{dropped} ids past the tokenizer's vocabulary]" if dropped else "")


def check_verify(verify: str, temperature: float) -> None:
    """Greedy verification reproduces greedy decoding only: it refuses a temperature."""
    if verify == "greedy" and temperature > 0:
        raise ValueError(f"greedy verification needs temperature 0: {temperature=}; use --verify stochastic")


def compare(target, drafts, tree, prompt, prompt_lengths, *, verify: str = "greedy", max_new_tokens: int,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, eos_id=None, top_k: int = 0,
            min_p: float = 0.0, stop_strings=None, decode=None,
            decoder: SpeculativeDecoder | None = None) -> Report:
    """Runs the incremental and the speculative decoding on the same prompts and times both.

    Args:
      target: the model to reproduce.
      drafts: its drafts, of its vocabulary: `Transformer`s or `spec.Drafter`s (e.g. a
        `spec.FeatureDrafter` over this target).
      tree: ExpansionTree, MergedTree or DynamicTree.
      prompt, prompt_lengths: right-padded ids [B, P] and lengths [B].
      verify: "greedy" or "stochastic".
      max_new_tokens, temperature, top_p, top_k, min_p, eos_id, stop_strings, decode: as
        `SpeculativeDecoder.generate` (with stop strings both run in chunks).
      seed: PRNG seed of both decodings.
      decoder: a `SpeculativeDecoder` of this target, drafts, tree and verify mode to time, so that
        a caller that already generated with it (the CLI streams one prompt first) does not compile
        its loop again; None builds one.
    """
    check_verify(verify, temperature)
    if decoder is None:
        decoder = SpeculativeDecoder(target, drafts, tree=tree, verify=verify)
    elif decoder.tree != tree or decoder.verify != verify:
        raise ValueError(f"decoder has tree={decoder.tree} and verify={decoder.verify!r}, "
                         f"but the comparison is of tree={tree} and {verify=}")
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  rng=jax.random.key(seed), eos_id=eos_id, top_k=top_k, min_p=min_p)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, decode=decode)
    base, t_base = timed(lambda: generate_incremental(target, prompt, prompt_lengths, **kwargs))
    result, t_spec = timed(lambda: decoder.generate(prompt, prompt_lengths, **kwargs))
    prompt_lengths = np.asarray(prompt_lengths)
    new = lambda r: int((r.lengths - prompt_lengths).sum())  # noqa: E731
    context = int(prompt_lengths.max()) + max_new_tokens // 2  # the mean context of the run
    return Report(
        verify=verify, tree=decoder.tree, num_drafts=len(decoder.drafters), prompt_lengths=prompt_lengths,
        tokens=result.tokens, lengths=result.lengths, incremental_tokens=base.tokens,
        incremental_lengths=base.lengths, seconds=(t_base, t_spec), new_tokens=(new(base), new(result)),
        target_calls=(int(base.stats.target_calls), int(result.stats.target_calls)),
        histogram=np.asarray(result.stats.accepted_histogram),
        mean_accepted_length=float(result.stats.mean_accepted_length),
        cost=measure_cost_model(target, decoder, prompt.shape[0], context))


def format_report(report: Report) -> str:
    """The comparison as a text table."""
    inc, spe = report.tokens_per_s
    rows = [
        ("", "incremental", "speculative"),
        ("generated tokens", report.new_tokens[0], report.new_tokens[1]),
        ("target forward passes", report.target_calls[0], report.target_calls[1]),
        ("seconds", f"{report.seconds[0]:.3f}", f"{report.seconds[1]:.3f}"),
        ("tokens/s", f"{inc:.1f}", f"{spe:.1f}"),
        ("speedup", "", f"{report.speedup:.2f}x"),
        ("tokens per step", "1.00", f"{report.mean_accepted_length:.2f}"),
    ]
    lines = [f"{a:<24}{b:>12}{c:>14}" for a, b, c in rows]
    hist = "  ".join(f"{k}:{int(c)}" for k, c in enumerate(report.histogram) if k >= 1)
    lines.append(f"{'steps emitting k tokens':<24}  {hist}")
    if report.identical is not None:
        lines.append(f"tokens identical to incremental: {'yes' if report.identical else 'NO'}")
    c = report.cost
    drafts = " + ".join(f"{p} x {t * 1e3:.2f} ms" for p, t in zip(c.passes, c.t_draft))
    lines.append(
        f"cost model: {report.mean_accepted_length:.2f} tokens/step x t_decode {c.t_decode * 1e3:.2f} ms / "
        f"(draft passes {drafts} + t_verify {c.t_verify * 1e3:.2f} ms) = "
        f"{c.speedup(report.mean_accepted_length):.2f}x predicted, {report.speedup:.2f}x measured")
    return "\n".join(lines)
