"""Speculative decoding of a real chat model: incremental vs speculative on held-out chat prompts.

One command, one device. The target (e.g. SmolLM2-135M-Instruct: --target smollm2) answers the
evaluation prompts (benchmarks/prompts/chat_eval.jsonl, chat template applied) at each batch size,
alone (`spec.generate_incremental`) and with every draft x tree shape (`spec.SpeculativeDecoder`):
greedy (the tokens must equal the incremental ones; the run exits 1 if they do not) and sampled
(T=0.7 and T=1.0, top-p 0.95). Per configuration: tokens/s, speedup, mean accepted length,
acceptance by depth and the cost model's prediction next to the measured speedup:
    predicted = tokens per step x t_decode / (draft passes x t_draft + t_verify)
with t_decode one target decode step, t_verify one target pass over the N tree nodes, t_draft one
draft proposal over them (any `spec.Drafter`, timed through the protocol) and draft passes the
measured mean per step (`spec.comparison.mean_draft_passes`), all timed in this run at batch B
and the mean context of the run. Each row also gives the cost of one loop step measured inside
the jitted loop (seconds over target calls; for speculation also in incremental decode steps),
which the standalone timings overestimate by each call's launch overhead.

    # the GPU run (10-minute calls: --deadline writes what is done)
    PYTHONPATH=. python benchmarks/speculative_real.py --target smollm2 \\
        --draft examples/checkpoints/smollm2-draft --out results/real --deadline 9
    # CPU smoke run
    PYTHONPATH=. python benchmarks/speculative_real.py --target smollm2 \\
        --draft examples/checkpoints/smollm2-draft --prompts 2 --new-tokens 8 --batches 1 --out /tmp/real

Numerics (--numerics): "f32" runs both models in float32 with the highest matmul precision, so
greedy equality does not hang on rounding; "bf16-invariant" runs them in bfloat16 with a
batch-invariant target per tree (`fa2jax.model.with_invariant_rows`: every cached call padded to
R = that tree's nodes, so a row's numbers do not depend on how many rows a call has), whose greedy
tokens must equal incremental decoding padded alike ("incremental-R<R>" rows, timed: what the padding
costs); speedups are quoted against the plain bf16 incremental decoding ("incremental").

Writes <out>/speculative_real.json, .md and speedup_vs_batch.png after every configuration.
Rows stop at the tokenizer's eos (chat answers end), so tokens/s counts the tokens generated.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fa2jax import load_pretrained, load_tokenizer
from fa2jax.data import read_prompts
from fa2jax.model import with_invariant_rows, with_min_len
from spec import DynamicTree, ExpansionTree, SpeculativeDecoder, TreeTopology, generate_incremental
from spec.cli import chat_ids, model_path
from spec.comparison import mean_draft_passes, pad_prompts, seconds_per_call, seconds_per_proposal

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "chat_eval.jsonl"

TREES = {
    "chain5": ExpansionTree.chain(5),
    "specinfer": ExpansionTree.specinfer(),
    "wide": ExpansionTree((4, 2, 1, 1)),
    "dynamic16": DynamicTree(num_nodes=16, depth=6, top_k=4),
    # Wider dynamic trees: at batch 1 the target's pass over 32-128 nodes costs about what 16 do.
    # With the shipped head (CPU, float32, 8 eval prompts x 64 tokens, tokens per step): 64 nodes
    # at depth 5 / top-12 3.05, depth 6 / top-10 2.97, depth 8 / top-8 2.82; 96 at depth 6 / top-12
    # 3.18; 128 at depth 6 / top-12 3.34, depth 7 / top-16 3.29. 128 is the tree kernel's limit.
    "dynamic32": DynamicTree(num_nodes=32, depth=7, top_k=6),
    "dynamic64": DynamicTree(num_nodes=64, depth=5, top_k=12),
    "dynamic128": DynamicTree(num_nodes=128, depth=6, top_k=12),
}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    verify: str
    temperature: float
    top_p: float


def modes(names: list[str], top_p: float) -> list[Mode]:
    """Greedy, or sampled at the temperature in the name ("t0.7")."""
    out = []
    for name in names:
        if name == "greedy":
            out.append(Mode(name, "greedy", 0.0, 1.0))
        elif name.startswith("t"):
            out.append(Mode(name, "stochastic", float(name[1:]), top_p))
        else:
            raise ValueError(f"a mode is 'greedy' or 't<temperature>', got {name=}")
    return out


def tree_mask(tree) -> np.ndarray:
    """A mask of the tree's shape, to time N-node passes (a mask's cost does not depend on its pattern).  # [N, N]"""
    if isinstance(tree, DynamicTree):
        depth = tree.slot_depth
        parents = tuple([-1] + [tree.level_start(int(d) - 1) for d in depth[1:]])
        n = tree.num_nodes
        return TreeTopology(parents, (-1,) * n, (0,) * n, (True,) * n).ancestor_mask
    return tree.topology().ancestor_mask


def acceptance_by_depth(histogram: np.ndarray) -> list[float]:
    """P(the accepted path reaches depth d | it reached d - 1), d = 1 .. depth, from the histogram of
    tokens per step (entry k: steps that emitted k tokens, i.e. accepted down to depth k - 1)."""
    hist = np.asarray(histogram, np.float64)
    reached = hist[::-1].cumsum()[::-1]  # reached[k]: steps that emitted at least k tokens
    return [float(reached[d + 1] / reached[d]) if reached[d] > 0 else 0.0 for d in range(1, len(hist) - 1)]


def batches_of(ids: list[list[int]], batch: int, width: int) -> list[tuple[jax.Array, jax.Array]]:
    """The prompts in batches of `batch` rows, the last one filled by wrapping around; one width."""
    rows = [ids[i % len(ids)] for i in range(-(-len(ids) // batch) * batch)]
    out = []
    for first in range(0, len(rows), batch):
        prompt, lengths = pad_prompts(rows[first: first + batch])
        prompt = np.pad(prompt, ((0, 0), (0, width - prompt.shape[1])))
        out.append((jnp.asarray(prompt), jnp.asarray(lengths)))
    return out


def run_all(generate, batches) -> tuple[list, float]:
    """Compiles with the first batch, then runs every batch: (results, seconds of the timed pass)."""
    jax.block_until_ready(generate(*batches[0]).tokens)
    start = time.perf_counter()
    results = [generate(*b) for b in batches]
    jax.block_until_ready([r.tokens for r in results])
    return [jax.device_get(r) for r in results], time.perf_counter() - start


def loop_steps(results) -> int:
    """Target calls of every batch's run (its loop steps, the prefill included)."""
    return int(sum(int(r.stats.target_calls) for r in results))


def new_tokens(results, batches) -> int:
    return int(sum((np.asarray(r.lengths) - np.asarray(b[1])).sum() for r, b in zip(results, batches)))


def write_outputs(out: Path, record: dict) -> None:
    """JSON, a markdown table and the speedup-vs-batch plot of everything measured so far."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative_real.json").write_text(json.dumps(record, indent=1))
    lines = [f"{record['device']}, jax {record['jax']}, {record['date']}, numerics {record['args']['numerics']}, "
             f"{record['prompts']} prompts, up to {record['args']['new_tokens']} new tokens",
             "", "| mode | B | draft | tree | N | tok/s | speedup | predicted | tokens/step | step ms (decode steps) "
             "| acceptance by depth | identical |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        depth = " ".join(f"{a:.2f}" for a in r.get("acceptance_by_depth", []))
        same = {True: "yes", False: "**NO**", None: ""}[r.get("identical")]
        predicted = f"{r['predicted_speedup']:.2f}" if "predicted_speedup" in r else ""
        step = (f"{r['step_ms']:.2f}" + (f" ({r['step_cost']:.2f})" if "step_cost" in r else "")) if "step_ms" in r else ""
        lines.append(f"| {r['mode']} | {r['batch']} | {r['draft']} | {r['tree']} | {r['nodes']} | "
                     f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f} | {predicted} | {r['mean_accepted']:.2f} | "
                     f"{step} | {depth} | {same} |")
    (out / "speculative_real.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec_rows = [r for r in record["rows"] if r["draft"] != "-"]
    mode_names = list(dict.fromkeys(r["mode"] for r in spec_rows))
    if not mode_names:
        return
    fig, axes = plt.subplots(1, len(mode_names), figsize=(5 * len(mode_names), 4), squeeze=False)
    for ax, mode in zip(axes[0], mode_names):
        for (draft, tree), group in itertools.groupby(
                sorted((r for r in spec_rows if r["mode"] == mode), key=lambda r: (r["draft"], r["tree"], r["batch"])),
                key=lambda r: (r["draft"], r["tree"])):
            group = list(group)
            ax.plot([r["batch"] for r in group], [r["speedup"] for r in group], "o-", label=f"{draft} {tree}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over incremental")
        ax.set_title(mode)
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(record['target']).name} on {record['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_batch.png", dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the chat model: any fa2jax.load_pretrained path, or smollm2")
    p.add_argument("--draft", help="an independent draft model (a Transformer in any loadable format)")
    p.add_argument("--feature-draft", help="a feature head folder (fa2jax.feature_head.load_feature_head)")
    p.add_argument("--prompt-file", default=str(DEFAULT_PROMPTS), help="JSONL or text prompts (chat template applied)")
    p.add_argument("--prompts", type=int, help="use the first N prompts (default: all)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens per answer at most (rows stop at eos)")
    p.add_argument("--batches", default="1,4,16", help="batch sizes")
    p.add_argument("--modes", default="greedy,t0.7,t1.0", help="greedy and/or t<temperature>")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass of the sampled modes")
    p.add_argument("--trees", default="chain5,specinfer,dynamic16", help=f"of {sorted(TREES)}")
    p.add_argument("--numerics", choices=("f32", "bf16-invariant"), default="f32")
    p.add_argument("--deadline", type=float, help="minutes: start no configuration after this")
    p.add_argument("--out", default="speculative_real", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if not (args.draft or args.feature_draft):
        parser.error("give --draft and/or --feature-draft")
    unknown = [t for t in args.trees.split(",") if t not in TREES]
    if unknown:
        parser.error(f"--trees: unknown {unknown}; known: {sorted(TREES)}")
    try:
        target_path = model_path(args.target)
        draft_path = model_path(args.draft) if args.draft else None
        run_modes = modes(args.modes.split(","), args.top_p)
    except ValueError as e:
        parser.error(str(e))
    trees = {name: TREES[name] for name in args.trees.split(",")}
    batch_sizes = [int(b) for b in args.batches.split(",")]

    tokenizer = load_tokenizer(target_path)
    texts = read_prompts(args.prompt_file)[: args.prompts]
    ids = [chat_ids(tokenizer, t) for t in texts]
    width = max(len(x) for x in ids)
    min_len = width + args.new_tokens + max(t.num_nodes for t in trees.values())
    if args.numerics == "f32":
        jax.config.update("jax_default_matmul_precision", "highest")
        dtype, invariant = jnp.float32, False
    else:
        dtype, invariant = jnp.bfloat16, True
    target = with_min_len(load_pretrained(target_path, dtype=dtype), min_len)
    # bf16-invariant: each tree's verifier pads every cached call to its own node count R (so a small
    # tree does not pay for the largest one's rows); the same arrays under another config.
    verifiers = {}

    def verifier(tree):
        rows = tree.num_nodes if invariant else 0
        if rows not in verifiers:
            verifiers[rows] = with_invariant_rows(target, rows) if rows else target
        return rows, verifiers[rows]

    drafts = {}
    if draft_path:
        drafts["model"] = with_min_len(load_pretrained(draft_path, dtype=dtype), min_len)
    if args.feature_draft:
        from fa2jax.feature_head import load_feature_head  # the feature-draft package, only when asked for
        from spec.feature_draft import FeatureDrafter

        drafts["feature"] = FeatureDrafter(load_feature_head(args.feature_draft, dtype=dtype), target)
    eos = tokenizer.eos_ids

    record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=jax.devices()[0].device_kind, jax=jax.__version__, args=vars(args), target=target_path,
                  target_config=str(target.config), prompts=len(texts),
                  drafts={k: str(getattr(d, "config", d)) for k, d in drafts.items()}, rows=[], stopped_early=None)
    out = Path(args.out)
    decoders = {}
    mismatches = []

    def out_of_time() -> bool:
        if args.deadline and time.perf_counter() - start > 60 * args.deadline:
            record["stopped_early"] = f"--deadline {args.deadline} min reached"
            return True
        return False

    # Batch-major: every mode at the first batch size before the next size, so a deadline cuts the
    # largest batches (the bars that matter most are at batch 1, greedy and sampled).
    for batch, mode in itertools.product(batch_sizes, run_modes):
        if out_of_time():
            break
        batches = batches_of(ids, batch, width)
        sampling = dict(max_new_tokens=args.new_tokens, temperature=mode.temperature, top_p=mode.top_p,
                        eos_id=eos, rng=jax.random.key(args.seed))
        context = width + args.new_tokens // 2
        # The baseline: plain incremental decoding (bf16 without row padding in bf16-invariant mode);
        # every speedup is quoted against it.
        t_decode = seconds_per_call(target, "decode", jnp.zeros((batch, 1), jnp.int32), cache_len=context + 1,
                                    context=context)
        base, base_s = run_all(lambda p, n: generate_incremental(target, p, n, **sampling), batches)
        base_tokens = new_tokens(base, batches)
        base_step_ms = 1e3 * base_s / loop_steps(base)  # one decode step inside the jitted loop
        record["rows"].append(dict(mode=mode.name, batch=batch, draft="-", tree="incremental", nodes=1,
                                   tokens=base_tokens, seconds=base_s, tokens_per_s=base_tokens / base_s,
                                   speedup=1.0, mean_accepted=1.0, t_decode_ms=1e3 * t_decode,
                                   step_ms=base_step_ms))
        write_outputs(out, record)
        print(f"{mode.name} B={batch} incremental: {base_tokens / base_s:.1f} tokens/s", flush=True)
        references = {0: base}  # per row padding R: the incremental tokens greedy speculation must equal
        for (kind, draft), (tree_name, tree) in itertools.product(drafts.items(), trees.items()):
            if out_of_time():
                break
            rows, model = verifier(tree)
            # Greedy tokens must equal the same decoding padded to R rows (timed too: what the padding
            # costs); sampled runs have no such reference to compute.
            if mode.verify == "greedy" and rows not in references:
                padded, padded_s = run_all(lambda p, n: generate_incremental(model, p, n, **sampling), batches)
                references[rows] = padded
                padded_tokens = new_tokens(padded, batches)
                record["rows"].append(dict(mode=mode.name, batch=batch, draft="-", tree=f"incremental-R{rows}",
                                           nodes=1, tokens=padded_tokens, seconds=padded_s,
                                           tokens_per_s=padded_tokens / padded_s,
                                           speedup=(padded_tokens / padded_s) / (base_tokens / base_s),
                                           mean_accepted=1.0))
                write_outputs(out, record)
            key = (kind, tree_name, mode.verify)
            if key not in decoders:
                decoders[key] = SpeculativeDecoder(model, draft, tree=tree, verify=mode.verify)
            decoder = decoders[key]
            results, seconds = run_all(lambda p, n: decoder.generate(p, n, **sampling), batches)
            tokens = new_tokens(results, batches)
            histogram = np.sum([np.asarray(r.stats.accepted_histogram) for r in results], axis=0)
            steps = max(histogram[1:].sum(), 1)
            accepted = float((np.arange(histogram.size) * histogram).sum() / steps)
            t_verify = seconds_per_call(model, "score_tree", jnp.zeros((batch, tree.num_nodes), jnp.int32),
                                        tree_mask(tree), cache_len=context + tree.num_nodes, context=context)
            t_draft = seconds_per_proposal(draft, jnp.ones((batch, tree.num_nodes), jnp.int32), tree_mask(tree),
                                           context=context, reps=5)
            passes = mean_draft_passes(decoder, histogram)[0]
            step_ms = 1e3 * seconds / loop_steps(results)
            row = dict(mode=mode.name, batch=batch, draft=kind, tree=tree_name, nodes=tree.num_nodes, tokens=tokens,
                       seconds=seconds, tokens_per_s=tokens / seconds,
                       speedup=(tokens / seconds) / (base_tokens / base_s), mean_accepted=accepted,
                       acceptance_by_depth=acceptance_by_depth(histogram), histogram=histogram.tolist(),
                       t_decode_ms=1e3 * t_decode, t_verify_ms=1e3 * t_verify, t_draft_ms=1e3 * t_draft,
                       draft_passes=passes,
                       predicted_speedup=accepted * t_decode / (passes * t_draft + t_verify),
                       # In-loop cost of a speculative step, in ms and in incremental decode steps: the
                       # standalone timings above include each call's launch overhead, the loop's do not.
                       step_ms=step_ms, step_cost=step_ms / base_step_ms)
            if mode.verify == "greedy":
                row["identical"] = all(np.array_equal(np.asarray(r.tokens), np.asarray(b.tokens))
                                       and np.array_equal(np.asarray(r.lengths), np.asarray(b.lengths))
                                       for r, b in zip(results, references[rows]))
                if not row["identical"]:
                    mismatches.append(f"{kind} {tree_name} B={batch}")
            record["rows"].append(row)
            write_outputs(out, record)
            print(f"{mode.name} B={batch} {kind} {tree_name}: {row['tokens_per_s']:.1f} tokens/s, "
                  f"{row['speedup']:.2f}x (cost model {row['predicted_speedup']:.2f}x), "
                  f"{accepted:.2f} tokens/step" + (f", identical: {row['identical']}" if "identical" in row else ""),
                  flush=True)
    record["seconds"] = time.perf_counter() - start
    write_outputs(out, record)
    print((out / "speculative_real.md").read_text())
    if record["stopped_early"]:
        print(record["stopped_early"])
    if mismatches:
        print(f"greedy speculative tokens differ from the incremental ones: {mismatches}", file=sys.stderr)
        raise SystemExit(1)
    return record


if __name__ == "__main__":
    main()
