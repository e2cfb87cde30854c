#!/usr/bin/env bash
# The speculative-decoding pair on one GPU, end to end: train the ~1B target on the stdlib with the
# FA2 kernels, measure the same model's training throughput with cuDNN attention, distil the ~20M
# draft from the target, then benchmark speculative vs incremental decoding on held-out prompts.
#
#   RUNS=/tmp/runs TARGET_MINUTES=9 bash benchmarks/gpu_speculative_pipeline.sh > /tmp/runs/log 2>&1
#
# Everything lands in $RUNS (metrics.jsonl, loss.png and checkpoints per run; speculative_*.json).
# Each training stage resumes from its newest checkpoint, so the script can be re-run after a stop.
set -euo pipefail
RUNS=${RUNS:-/tmp/runs}
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
mkdir -p "$RUNS"
stage() { echo "=== $(date -u +%H:%M:%S) $*"; }

stage target
python3 examples/train.py --preset target-1b --out "$RUNS/target" --resume --steps 300 --warmup-steps 30 \
  --eval-every 100 --checkpoint-every 1000 --stop-after-minutes "${TARGET_MINUTES:-9}" --no-progress

stage target-cudnn-throughput
python3 examples/train.py --preset target-1b --out "$RUNS/target-cudnn" --attention-impl cudnn --steps 20 \
  --warmup-steps 5 --log-every 5 --eval-every 1000 --checkpoint-every 1000 --no-progress \
  --stop-after-minutes 1.5

stage draft
python3 examples/train.py --preset draft-20m --teacher "$RUNS/target" --out "$RUNS/draft" --resume \
  --steps 800 --warmup-steps 50 --distill-weight 0.5 --eval-every 200 --checkpoint-every 1000 \
  --stop-after-minutes "${DRAFT_MINUTES:-3}" --no-progress

stage speculative-greedy
python3 benchmarks/speculative.py --target-ckpt "$RUNS/target" --draft-ckpt "$RUNS/draft" \
  --trees chain,specinfer,dynamic --modes greedy --out "$RUNS/speculative_greedy.json"

stage speculative-stochastic
python3 benchmarks/speculative.py --target-ckpt "$RUNS/target" --draft-ckpt "$RUNS/draft" \
  --trees specinfer --modes stochastic --out "$RUNS/speculative_stochastic.json"
stage done
