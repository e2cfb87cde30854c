"""Train an fa2jax Transformer on real text with the FlashAttention-2 kernels.

  python examples/train.py --preset tiny                      # CPU, the stdlib as data, minutes
  python examples/train.py --preset target-1b --out out/target
  python examples/train.py ... --extra-train-data /path/to/site-packages/numpy --suffix .py
  python examples/train.py --preset draft-20m --teacher out/target --distill-weight 0.5
  python examples/train.py ... --teacher out/target --teacher-continuations 4096   # + the target's own text
  python examples/train.py ... --resume                       # continue the run in --out exactly

Every field of TransformerConfig and TrainConfig is a flag (--d-model, --grad-accum, ...);
unset flags keep the preset's value. Writes <out>/checkpoints/, metrics.jsonl and loss.png.
"""
import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from fa2jax import checkpoint as ckpt
from fa2jax.data import Corpus, Document, find_documents, pack_corpus, split_documents
from fa2jax.tokenizer import BPETokenizer, ByteTokenizer
from fa2jax.training import TrainConfig, load_model, model_config_from_dict, presets, resolve_checkpoint, train

MODEL_FLAGS = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff", "rope_theta",
               "norm_eps", "max_len", "tie_embeddings")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets()), default="tiny")
    p.add_argument("--data", nargs="+", help="text files or folders (default: this Python's stdlib)")
    p.add_argument("--suffix", nargs="+", help="only files ending so, e.g. .py .md (default: all text)")
    p.add_argument("--extra-train-data", nargs="+",
                   help="more files or folders for the training split only (e.g. site-packages); the validation "
                        "split, and so the speculative benchmark's held-out prompts, stay those of --data")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--tokenizer", choices=("bpe", "bytes"), default="bpe")
    p.add_argument("--bpe-vocab", type=int, help="BPE vocabulary size (default: the preset's)")
    p.add_argument("--out", help="run folder (default: out/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--teacher", help="checkpoint or run folder to distil from (same tokenizer)")
    p.add_argument("--teacher-continuations", type=int, default=0,
                   help="with --teacher: add this many of the teacher's greedy continuations of training text to "
                        "the training split (a draft then also learns from text that its target writes)")
    p.add_argument("--continuation-prompt-len", type=int, default=64)
    p.add_argument("--continuation-len", type=int, default=192, help="new tokens per continuation")
    p.add_argument("--continuation-batch", type=int, default=256, help="continuations generated per call")
    p.add_argument("--dtype", help="compute dtype, e.g. bfloat16 (parameters stay float32)")
    p.add_argument("--attention-impl", choices=("pallas", "xla", "cudnn"),
                   help="default: pallas on GPU, automatic elsewhere")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stop-after-minutes", type=float,
                   help="checkpoint and exit after this much training time (continue with --resume)")
    base = presets()["tiny"]
    for name in MODEL_FLAGS:
        kind = type(getattr(base.model, name))
        p.add_argument("--" + name.replace("_", "-"), type=None if kind is bool else kind,
                       action=argparse.BooleanOptionalAction if kind is bool else "store")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default))
    return p.parse_args()


def teacher_continuations(teacher: str, tokenizer, docs, *, count: int, prompt_len: int, new_tokens: int,
                          batch: int, seed: int = 0) -> tuple[Document, ...]:
    """The teacher's greedy continuations of `count` windows of `prompt_len` tokens cut at random
    from `docs` (training documents only), each as a document of prompt + continuation.

    Speculative decoding asks the draft to predict what the target writes, and greedy target text
    (its own repetitions and idioms) is not quite the corpus: training on it moves the draft there.
    """
    from spec import generate_incremental

    model = load_model(teacher).inference_module()
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
        result = generate_incremental(model, jnp.asarray(chunk, jnp.int32), jnp.full((batch,), prompt_len, jnp.int32),
                                      max_new_tokens=new_tokens, eos_id=tokenizer.eos_id)
        tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
        for row in range(min(batch, len(windows) - first)):
            ids = [int(t) for t in tokens[row, : lengths[row]]]
            # Logit rows past the tokenizer's vocabulary are never trained; an untrained teacher can
            # still pick one. Keep the text up to there (and up to end-of-text).
            end = next((i for i, t in enumerate(ids) if t >= tokenizer.vocab_size or t == tokenizer.eos_id), len(ids))
            out.append(Document(f"teacher-continuation/{first + row}", tokenizer.decode(ids[:end])))
    return tuple(out)


def main():
    args = parse_args()
    preset = presets()[args.preset]
    out = args.out or f"out/{args.preset}"
    set_flags = lambda names: {n: getattr(args, n) for n in names if getattr(args, n) is not None}  # noqa: E731
    train_cfg = dataclasses.replace(preset.train, **set_flags(f.name for f in dataclasses.fields(TrainConfig)))
    docs = find_documents(args.data, args.suffix)
    corpus = split_documents(docs, args.val_fraction)
    extra = tuple(find_documents(args.extra_train_data, args.suffix)) if args.extra_train_data else ()
    corpus = Corpus(train=corpus.train + extra, val=corpus.val)
    print(f"{len(docs) + len(extra)} files: {len(corpus.train)} train ({len(extra)} training-only), "
          f"{len(corpus.val)} validation")

    latest = ckpt.latest_checkpoint(f"{out}/checkpoints") if args.resume else None
    if latest is not None:  # the run's own configs and tokenizer: exact continuation
        meta = ckpt.read_metadata(latest)
        model_cfg = model_config_from_dict(meta["model_config"])
        train_cfg = ckpt.config_from_dict(TrainConfig, meta["train_config"])
        tokenizer = ckpt.read_tokenizer(latest)
        print(f"resuming from {latest} (size and training flags are taken from it)")
    else:
        if args.teacher:
            tokenizer = ckpt.read_tokenizer(resolve_checkpoint(args.teacher))
        elif args.tokenizer == "bytes":
            tokenizer = ByteTokenizer()
        else:
            tokenizer = BPETokenizer.train((d.text for d in corpus.train), args.bpe_vocab or preset.bpe_vocab)
        teacher_vocab = args.teacher and ckpt.read_metadata(resolve_checkpoint(args.teacher))["model_config"]
        # Logit rows rounded up to a multiple of 128 for the matmul tiles; extra ids are never targets.
        vocab = teacher_vocab["vocab_size"] if teacher_vocab else -(-tokenizer.vocab_size // 128) * 128
        on_gpu = jax.default_backend() == "gpu"
        model_cfg = preset.model.replace(
            **{"max_len": max(preset.model.max_len, train_cfg.seq_len), **set_flags(MODEL_FLAGS)},
            vocab_size=vocab, param_dtype=jnp.float32, dtype=args.dtype or preset.model.dtype,
            attention_impl=args.attention_impl or ("pallas" if on_gpu else None))
    if args.teacher_continuations:
        if not args.teacher:
            raise ValueError(f"--teacher-continuations {args.teacher_continuations} needs --teacher")
        start = time.perf_counter()
        continuations = teacher_continuations(
            args.teacher, tokenizer, corpus.train, count=args.teacher_continuations,
            prompt_len=args.continuation_prompt_len, new_tokens=args.continuation_len, batch=args.continuation_batch)
        corpus = Corpus(train=corpus.train + continuations, val=corpus.val)
        print(f"{len(continuations)} teacher continuations in {time.perf_counter() - start:.0f} s")
    train_rows, val_rows = pack_corpus(corpus, tokenizer, train_cfg.seq_len)
    print(f"{train_rows.num_rows} x {train_cfg.seq_len} training rows, {val_rows.num_rows} validation rows, "
          f"vocabulary {tokenizer.vocab_size}")
    summary = train(model_cfg, train_cfg, train_rows, val_rows, out, tokenizer, resume=args.resume,
                    teacher=args.teacher, progress=not args.no_progress,
                    stop_after_seconds=args.stop_after_minutes and 60 * args.stop_after_minutes)
    for key in ("step", "loss", "val_loss", "val_ppl", "acceptance_before", "acceptance_after"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    print(f"wrote {out}/checkpoints, {out}/metrics.jsonl, {out}/loss.png")


if __name__ == "__main__":
    main()
