"""A distillation corpus: a chat model's own sampled answers to a prompt file, as JSON Lines.

  python examples/chat_corpus.py --teacher model.gguf --prompts benchmarks/prompts/chat_train.jsonl \\
      --out corpus.jsonl --samples 2 --max-new-tokens 224 --temperature 0.8 --min-p 0.05

Each line is one answer (fa2jax.training.continuations.teacher_chat_responses): prompt, token ids
and the rendered conversation under "text", which `examples/train.py --jsonl corpus.jsonl` trains
on. Lines are written batch by batch, so a run stopped by --deadline-minutes (or Ctrl-C) leaves
every finished batch on disk.
"""
import argparse
import json
import sys
import time

from fa2jax import load_pretrained, load_tokenizer
from fa2jax.data import read_prompts
from fa2jax.training.continuations import teacher_chat_responses


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the chat model (any format of fa2jax.load_pretrained)")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' per line, or text, one prompt a line")
    p.add_argument("--out", required=True, help="the JSONL file to write (replaced)")
    p.add_argument("--samples", type=int, default=1, help="answers per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=32, help="answers per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-minutes", type=float,
                   help="start no batch that the last one's time says would end past this")
    args = p.parse_args(argv)
    prompts = read_prompts(args.prompts)
    teacher, tokenizer = load_pretrained(args.teacher), load_tokenizer(args.teacher)
    start, last, count, tokens, stopped = time.perf_counter(), 0.0, 0, 0, 0
    batches = teacher_chat_responses(teacher, tokenizer, prompts, samples=args.samples,
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, min_p=args.min_p, batch=args.batch, seed=args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        while True:
            before = time.perf_counter()
            if args.deadline_minutes and before - start + last > 60 * args.deadline_minutes:
                print(f"--deadline-minutes {args.deadline_minutes}: stopping before the next batch")
                break
            records = next(batches, None)
            if records is None:
                break
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            last = time.perf_counter() - before
            count += len(records)
            tokens += sum(len(r["response_ids"]) for r in records)
            stopped += sum(r["stopped"] for r in records)
            print(f"{count} answers, {tokens} answer tokens, {stopped} ended by eos, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    summary = {"answers": count, "answer_tokens": tokens, "ended_by_eos": stopped, "prompts": len(prompts),
               "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)
