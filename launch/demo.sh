#!/usr/bin/env bash
# The README's main job: a short multi-task HyperPrompt-Global run on the bundled tasks, ZeRO-3
# over 2 local CPU ranks (gloo), evaluated per task as it trains, then the paper's multi-task
# baseline on the same data (conditioning.variant=mtl: the same T5 without conditioning, the
# task's name as a text prefix of every input), a closing table of both, an export and plots.
# Usage: bash launch/demo.sh [RUN_DIR] (make demo calls it inside the project venv).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/demo}
BASELINE_DIR="$RUN_DIR/baseline-mtl"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# CPU ranks even on a GPU host: gloo, and DeepSpeed's CPU accelerator (its launcher's too).
export HP_DEVICE=cpu DS_ACCELERATOR=cpu
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Reject a bad config before any rank starts.
hp-deepspeed validate --config configs/demo.yaml "run.dir=$RUN_DIR" > /dev/null

# Under the launch scripts' supervisor, as launch/local.sh: Ctrl-C saves and stops every rank
# (exit 75; `make demo` again resumes), a second Ctrl-C stops at once, and nothing is left behind.
# The launcher's own info lines are left out (--log_level warning).
train() {  # RUN_DIR [overrides...]
  local dir=$1; shift
  python -m hp_deepspeed.launching.supervise -- deepspeed --log_level warning --num_gpus 2 \
    --master_port "${MASTER_PORT:-29533}" --module hp_deepspeed.cli \
    train --config configs/demo.yaml "run.dir=$dir" "$@" --resume auto
}

echo "== HyperPrompt-Global, ZeRO-3 over 2 ranks =="
train "$RUN_DIR"
echo "== the paper's multi-task baseline (MTL): the same T5, no conditioning, inputs prefixed with the task name =="
# Evaluated once, at the end; one checkpoint (it is only here to be compared).
train "$BASELINE_DIR" conditioning.variant=mtl eval.every=0 checkpoint.interval=100000 checkpoint.keep_last=1

hp-deepspeed export --run-dir "$RUN_DIR" --out "$RUN_DIR/export"
echo "== closing table: HyperPrompt-Global beside the MTL baseline, exact match (%) on the validation splits =="
hp-deepspeed report "$RUN_DIR" --baseline "$BASELINE_DIR"
echo "One seed each: the table shows what each run reached, not which of the two is better;"
echo "the comparison with seeds, tuned rates and significance tests is python -m bench.fidelity (docs/fidelity.md)."
echo "demo finished: checkpoints in $RUN_DIR/checkpoints, export in $RUN_DIR/export, plots in $RUN_DIR/report"
