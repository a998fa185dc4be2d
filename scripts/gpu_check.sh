#!/usr/bin/env bash
# The GPU checks, as one command for a lent GPU machine (DEVELOPERS.md, "GPU checks").
#
#   scripts/gpu_check.sh smoke [ARGS]   # the main job's user paths (bench.gpu_smoke), ~5 min on one H100/H200
#   scripts/gpu_check.sh speed [ARGS]   # the GPU speed stages (bench.gpu --full), ~8 min
#
# ARGS go to the Python command (e.g. `smoke --suites zero3_bf16`, `speed --budget-s 300`).
# Wheels the GPU image lacks are taken from .whl when it holds any (../shared/device/prepare_wheels.sh
# fills it) and installed into /tmp/site. Everything is written under $OUT (default ./gpu_check):
# the card, driver and package versions first, then the command's own results and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: scripts/gpu_check.sh smoke|speed [ARGS]}
shift
case $what in
  smoke|speed) ;;
  *) echo "scripts/gpu_check.sh: unknown check '$what' (expected smoke or speed)" >&2; exit 2 ;;
esac
out=${OUT:-$PWD/gpu_check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
# TORCH_CUDA_ARCH_LIST needs nothing here: every rank and every bench stage rewrites the 9.0a
# that Hopper images set (launching/device.py, prepare_process).
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$PYTHON" -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count()); print("deepspeed", deepspeed.__version__, "transformers", transformers.__version__)'
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
case $what in
  smoke) exec "$PYTHON" -m bench.gpu_smoke --out "$out/smoke" "$@" ;;
  speed) exec "$PYTHON" -m bench.gpu --full --out "$out/speed" "$@" ;;
esac
