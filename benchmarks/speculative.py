"""Speculative vs incremental decoding: tokens/s, accepted length and the cost model, per tree.

One process, one device: the target decoding alone (`spec.generate_incremental`) is the baseline,
then `spec.SpeculativeDecoder` for every tree configuration (chain, SpecInfer's default, wide,
dynamic, merged of two drafts) under greedy and stochastic verification. Prints a table last and
writes JSON to --out.

    PYTHONPATH=. python benchmarks/speculative.py --out /tmp/speculative.json
    PYTHONPATH=. python benchmarks/speculative.py --target-ckpt runs/target --draft-ckpt runs/draft
    PYTHONPATH=. python benchmarks/speculative.py --quick      # tiny models, CPU smoke run

Cost model (SpecInfer section 6; all times measured in the same run):
    speedup ~= tokens per step * t_decode(target) / (draft passes * t_draft + t_verify(target))
where t_decode is one target decode step, t_verify one target `score_tree` over the N nodes,
t_draft one draft `score_tree` over the N nodes, and draft passes the measured mean per step
(one per level, plus the K/V fix-up pass in steps that accept a deepest-level node:
`spec.comparison.mean_draft_passes`). Without --target-ckpt / --draft-ckpt the models are random
(presets), so acceptance is near its floor of 1 token per step; --draft-preset same drafts with
the target itself, the ceiling (depth + 1 tokens per step).
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fa2jax import Transformer, TransformerConfig, load_pretrained, load_tokenizer
from fa2jax.model import with_invariant_rows
from pallas_kernels.testing import median_time
from spec import DynamicTree, ExpansionTree, MergedTree, SpeculativeDecoder, TreeTopology, generate_incremental
from spec.comparison import mean_draft_passes


def tree_configs(quick: bool) -> dict:
    """Tree name -> (tree, number of drafts)."""
    if quick:
        return {
            "chain": (ExpansionTree.chain(3), 1),
            "specinfer": (ExpansionTree((1, 2, 1)), 1),
            "wide": (ExpansionTree((4, 2)), 1),
            "dynamic": (DynamicTree(num_nodes=8, depth=3, top_k=2), 1),
            "merged": (MergedTree((ExpansionTree((1, 2, 1)), ExpansionTree((2, 1)))), 2),
        }
    return {
        "chain": (ExpansionTree.chain(6), 1),
        "chain4": (ExpansionTree.chain(4), 1),
        "chain8": (ExpansionTree.chain(8), 1),
        "specinfer": (ExpansionTree.specinfer(), 1),
        "narrow": (ExpansionTree((2, 1, 1, 1, 1, 1)), 1),
        "dynamic16": (DynamicTree(num_nodes=16, depth=8, top_k=2), 1),
        "wide": (ExpansionTree((8, 2)), 1),
        "dynamic": (DynamicTree(num_nodes=32, depth=6, top_k=4), 1),
        "merged": (MergedTree((ExpansionTree.specinfer(), ExpansionTree((2, 1, 1, 1)))), 2),
    }


def model_for_run(preset: str, ckpt: str | None, seed: int, min_len: int, dtype=None,
                  invariant_rows: int = 0) -> Transformer:
    """A model from a checkpoint folder (`fa2jax.load_pretrained`), or a random one from a
    `TransformerConfig` preset.

    `dtype` overrides the compute dtype (float32 for the bitwise greedy-equality check);
    `invariant_rows` makes the cached calls batch-invariant (see `TransformerConfig`). A checkpoint's
    weights are cast once to the compute dtype, so a bf16 model reads bf16 weights rather than
    casting float32 ones on every step.
    """
    if ckpt:
        model = load_pretrained(ckpt, dtype=dtype, invariant_rows=invariant_rows)
        if model.config.max_len < min_len:
            raise ValueError(f"checkpoint model too short for this run: {model.config.max_len=} {min_len=}")
        return model
    config = getattr(TransformerConfig, preset)()
    config = config.replace(max_len=max(config.max_len, min_len), invariant_rows=invariant_rows,
                            **({"dtype": dtype} if dtype else {}))
    return Transformer(config, rngs=nnx.Rngs(seed))


def real_text_prompts(ckpt: str, batch: int, prompt_len: int) -> jax.Array:
    """The first `prompt_len` tokens of `batch` held-out stdlib files, in the checkpoint's tokenizer.

    Trained models accept far more of a draft's guesses on text like their training data than on
    random token ids, so checkpoints are measured on real (validation-split) prompts.
    """
    from fa2jax.data import find_documents, split_documents

    tokenizer = load_tokenizer(ckpt)
    rows = []
    for doc in split_documents(find_documents(None, None), 0.05).val:
        ids = tokenizer.encode(doc.text)
        if len(ids) >= prompt_len:
            rows.append(np.asarray(ids[:prompt_len], np.int32))
        if len(rows) == batch:
            return jnp.asarray(np.stack(rows))
    raise ValueError(f"fewer than {batch=} validation files have {prompt_len=} tokens")


def component_times(model: Transformer, batch: int, context: int, num_nodes: int, mask, repeats: int) -> dict:
    """Seconds of one decode step and one N-node tree pass of `model` after `context` tokens."""
    graphdef, params = nnx.split(model)
    cache = model.init_cache(batch, context + num_nodes + 1)
    cache = cache.replace(lengths=jnp.full((batch,), context, jnp.int32))
    one = jnp.ones((batch, 1), jnp.int32)
    nodes = jnp.ones((batch, num_nodes), jnp.int32)

    @jax.jit
    def decode(params, cache):
        return nnx.merge(graphdef, params).decode(one, cache)[0]

    @jax.jit
    def tree(params, cache, mask):
        return nnx.merge(graphdef, params).score_tree(nodes, mask, cache)[0]

    return {"decode": median_time(lambda: decode(params, cache), repeats),
            "tree": median_time(lambda: tree(params, cache, mask), repeats)}


def divergence(model: Transformer, tokens: np.ndarray, baseline: np.ndarray, prompt_len: int) -> list[dict]:
    """Where greedy speculative output first differs from the baseline, and how close a call it was.

    For each differing row: the first differing position and the gap between the model's top two
    logits there (one full forward over the baseline's tokens before it). A gap near zero is a
    near-tie that rounding decides (bf16 verify vs decode); a large gap would point at a bug.
    """
    report = []
    for row in np.flatnonzero(np.any(tokens != baseline, axis=1)):
        position = int(np.argmax(tokens[row] != baseline[row]))
        logits = model(jnp.asarray(baseline[row:row + 1, :position]))[0, -1].astype(jnp.float32)
        top2 = jax.lax.top_k(logits, 2)[0]
        report.append(dict(row=int(row), new_token_index=position - prompt_len,
                           top2_logit_gap=float(top2[0] - top2[1]),
                           baseline_token=int(baseline[row, position]), speculative_token=int(tokens[row, position])))
    return report


def tree_mask(tree):
    """A mask of the tree's shape for timing the N-node passes.  # [N, N] bool"""
    if isinstance(tree, DynamicTree):
        # The run-time shape varies; every slot hanging under the first slot of the level above
        # has the same depths, and a mask's cost does not depend on its pattern.
        depth = tree.slot_depth
        parents = tuple([-1] + [tree.level_start(int(d) - 1) for d in depth[1:]])
        n = tree.num_nodes
        return jnp.asarray(TreeTopology(parents, (-1,) * n, (0,) * n, (True,) * n).ancestor_mask)
    return jnp.asarray(tree.topology().ancestor_mask)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target-preset", default="target_1b")
    parser.add_argument("--draft-preset", default="draft_20m", help='a preset name, or "same" for the target')
    parser.add_argument("--target-ckpt", default=None, help="model folder of the target (fa2jax.load_pretrained)")
    parser.add_argument("--draft-ckpt", default=None, help="model folder of the draft (fa2jax.load_pretrained)")
    parser.add_argument("--draft2-ckpt", default=None, help="second draft of merged trees (default: a reseeded draft)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=1,
                        help="run every configuration over this many prompts (batches) in turn and report "
                             "the totals: accepted lengths vary a lot from one text to the next")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="for stochastic verification")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--trees", default="chain,specinfer,wide,dynamic,merged")
    parser.add_argument("--modes", default="greedy,stochastic")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny models and trees: a CPU smoke run")
    parser.add_argument("--out", default="speculative.json")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="compute dtype of both models; float32 also sets HIGHEST matmul precision, "
                             "so that greedy equality with the baseline is not at the mercy of bf16 rounding")
    parser.add_argument("--target-dtype", default=None, choices=("float32", "bfloat16"),
                        help="compute dtype of the target alone (overrides --dtype)")
    parser.add_argument("--draft-dtype", default=None, choices=("float32", "bfloat16"),
                        help="compute dtype of the drafts alone (overrides --dtype); the drafts' rounding "
                             "never changes greedy output, only how often guesses are accepted")
    parser.add_argument("--invariant-rows", type=int, default=0,
                        help="R > 0: a batch-invariant target (every cached call R rows, fixed attention "
                             "tiles), so greedy output can equal incremental decoding in bf16; trees of "
                             "more than R nodes are skipped, and the plain incremental baseline is timed too")
    args = parser.parse_args()
    if args.quick:
        args.target_preset = "tiny"
        args.draft_preset = "same" if args.draft_preset == "same" else "tiny"
        args.prompt_len, args.max_new_tokens, args.repeats = 16, 24, 1

    target_dtype, draft_dtype = args.target_dtype or args.dtype, args.draft_dtype or args.dtype
    if "float32" in (target_dtype, draft_dtype):  # bf16 matmuls are unaffected by this setting
        jax.config.update("jax_default_matmul_precision", "highest")
    trees = {k: v for k, v in tree_configs(args.quick).items() if k in args.trees.split(",")}
    if args.invariant_rows:
        skipped = [k for k, (t, _) in trees.items() if t.num_nodes > args.invariant_rows]
        if skipped:
            print(f"skipping trees of more than {args.invariant_rows} nodes: {skipped}")
        trees = {k: v for k, v in trees.items() if k not in skipped}
    max_nodes = max([t.num_nodes for t, _ in trees.values()] + [args.invariant_rows])
    min_len = args.prompt_len + args.max_new_tokens + max_nodes
    target = model_for_run(args.target_preset, args.target_ckpt, 0, min_len, target_dtype, args.invariant_rows)
    plain_target = with_invariant_rows(target, 0) if args.invariant_rows else None
    if args.draft_preset == "same" and not args.draft_ckpt:
        drafts = [target, target]
    else:
        drafts = [model_for_run(args.draft_preset, args.draft_ckpt, 1, min_len, draft_dtype),
                  model_for_run(args.draft_preset, args.draft2_ckpt, 2, min_len, draft_dtype)]
    vocab = target.config.vocab_size

    if args.target_ckpt:
        rows_of_text = real_text_prompts(args.target_ckpt, args.batch * args.prompts, args.prompt_len)
    else:
        rng = np.random.default_rng(0)
        rows_of_text = jnp.asarray(rng.integers(0, vocab, (args.batch * args.prompts, args.prompt_len)), jnp.int32)
    prompts = [rows_of_text[i * args.batch:(i + 1) * args.batch] for i in range(args.prompts)]
    lengths = jnp.full((args.batch,), args.prompt_len, jnp.int32)
    generated = args.prompts * args.batch * args.max_new_tokens
    rows = []
    baselines = {}
    for mode in args.modes.split(","):
        temperature = 0.0 if mode == "greedy" else args.temperature
        sampling = dict(temperature=temperature, top_p=args.top_p, rng=jax.random.key(0))
        def incremental(model):
            return lambda: [generate_incremental(model, prompt, lengths, max_new_tokens=args.max_new_tokens,
                                                 **sampling).tokens for prompt in prompts]
        seconds = median_time(incremental(target), args.repeats)
        baseline_tokens = [np.asarray(tokens) for tokens in incremental(target)()]
        baselines[mode] = seconds
        rows.append(dict(mode=mode, tree="incremental", nodes=args.invariant_rows or 1,
                         tokens_per_s=generated / seconds, speedup=1.0, mean_accepted=1.0,
                         target_calls=args.prompts * args.max_new_tokens))
        plain_seconds = None
        if plain_target is not None:  # what padding every step to R rows costs the baseline
            plain_seconds = median_time(incremental(plain_target), args.repeats)
            plain_tokens = [np.asarray(tokens) for tokens in incremental(plain_target)()]
            rows.append(dict(mode=mode, tree="incr-plain", nodes=1, tokens_per_s=generated / plain_seconds,
                             speedup=seconds / plain_seconds, mean_accepted=1.0,
                             target_calls=args.prompts * args.max_new_tokens,
                             identical_to_incremental=all(np.array_equal(a, b) for a, b in
                                                          zip(plain_tokens, baseline_tokens))
                             if mode == "greedy" else None))
        for name, (tree, num_drafts) in trees.items():
            decoder = SpeculativeDecoder(target, drafts[:num_drafts], tree=tree, verify=mode)
            results = [decoder.generate(prompt, lengths, max_new_tokens=args.max_new_tokens, **sampling)
                       for prompt in prompts]
            seconds = median_time(
                lambda: [decoder.generate(prompt, lengths, max_new_tokens=args.max_new_tokens, **sampling).tokens
                         for prompt in prompts],
                args.repeats)
            calls = [int(r.stats.target_calls) for r in results]
            # Tokens per target call over all prompts (each prompt's mean weighted by its calls).
            accepted = sum(float(r.stats.mean_accepted_length) * c for r, c in zip(results, calls)) / sum(calls)
            mask = tree_mask(tree)
            context = args.prompt_len + args.max_new_tokens // 2
            t_target = component_times(target, args.batch, context, tree.num_nodes, mask, args.repeats)
            t_draft = component_times(drafts[0], args.batch, context, tree.num_nodes, mask, args.repeats)
            histogram = np.sum([np.asarray(r.stats.accepted_histogram) for r in results], axis=0)
            passes = sum(mean_draft_passes(decoder, histogram))
            predicted = accepted * t_target["decode"] / (passes * t_draft["tree"] + t_target["tree"])
            rows.append(dict(
                mode=mode, tree=name, nodes=tree.num_nodes, tokens_per_s=generated / seconds,
                speedup=baselines[mode] / seconds, mean_accepted=accepted,
                speedup_vs_plain_incremental=plain_seconds / seconds if plain_seconds else None,
                target_calls=sum(calls),
                histogram=histogram.tolist(),
                t_decode_target_ms=1e3 * t_target["decode"], t_verify_target_ms=1e3 * t_target["tree"],
                t_draft_ms=1e3 * t_draft["tree"], draft_passes=passes, predicted_speedup=predicted,
                identical_to_incremental=all(np.array_equal(np.asarray(r.tokens), base)
                                             for r, base in zip(results, baseline_tokens))
                if mode == "greedy" else None,
                divergence=[d for r, base in zip(results, baseline_tokens)
                            for d in divergence(target, np.asarray(r.tokens), base, args.prompt_len)]
                if mode == "greedy" else None))

    record = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=jax.devices()[0].device_kind, jax=jax.__version__, args=vars(args),
        target_config=str(target.config), draft_config=str(drafts[0].config), rows=rows)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))

    print(f"{record['device']}, jax {jax.__version__}, {args.prompts} prompt(s) of batch {args.batch}, "
          f"prompt {args.prompt_len}, "
          f"new tokens {args.max_new_tokens}, target {args.target_preset}, draft {args.draft_preset}")
    header = (f"{'mode':<10} {'tree':<12} {'N':>3} {'tok/s':>9} {'speedup':>8} {'acc.len':>7} "
              f"{'calls':>5} {'t_dec':>7} {'t_ver':>7} {'t_dft':>7} {'passes':>6} {'model':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        extra = (f" {r['t_decode_target_ms']:7.2f} {r['t_verify_target_ms']:7.2f} {r['t_draft_ms']:7.2f} "
                 f"{r['draft_passes']:6.2f} {r['predicted_speedup']:6.2f}") if "t_draft_ms" in r else ""
        same = {True: " same", False: " DIFFERENT"}.get(r.get("identical_to_incremental"), "")
        if r.get("speedup_vs_plain_incremental"):
            same += f" ({r['speedup_vs_plain_incremental']:.2f}x the plain incremental)"
        print(f"{r['mode']:<10} {r['tree']:<12} {r['nodes']:>3} {r['tokens_per_s']:9.1f} {r['speedup']:8.2f} "
              f"{r['mean_accepted']:7.2f} {r['target_calls']:5d}{extra}{same}")
    for r in rows:
        for d in r.get("divergence") or []:
            print(f"{r['tree']}: first differs at new token {d['new_token_index']} (prompt batch row "
                  f"{d['row']}); the target's top-2 logit gap there is {d['top2_logit_gap']:.4f}")
    print("times in ms; model = tokens/step * t_dec / (passes * t_dft + t_ver), the cost model's speedup; "
          "same/DIFFERENT: greedy tokens vs the incremental baseline")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
