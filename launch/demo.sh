#!/usr/bin/env bash
# The README's main job: a short multi-task HyperPrompt-Global run on the bundled tasks, ZeRO-3
# over 2 local CPU ranks (gloo), evaluated per task at the end, leaving a checkpoint and an
# export. Usage: bash launch/demo.sh [RUN_DIR]  (make demo calls it inside the project venv)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# CPU ranks even on a GPU host: gloo, and DeepSpeed's CPU accelerator (its launcher's too).
export HP_DEVICE=cpu DS_ACCELERATOR=cpu
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Reject a bad config before any rank starts.
hp-deepspeed validate --config configs/demo.yaml "run.dir=$RUN_DIR" > /dev/null

deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29533}" \
  --module hp_deepspeed.cli train --config configs/demo.yaml "run.dir=$RUN_DIR" --resume auto

hp-deepspeed export --run-dir "$RUN_DIR" --out "$RUN_DIR/export"
hp-deepspeed report "$RUN_DIR"
echo "demo finished: checkpoints in $RUN_DIR/checkpoints, export in $RUN_DIR/export, plots in $RUN_DIR/report"
