#!/usr/bin/env bash
# Issue #8's accelerator benchmarks in one go (train-step MFU, rollout vs roofline),
# each under its own time limit so one slow part cannot eat the others' budget.
#   bash bench/gpu_suite.sh [OUT_DIR]          # logs: OUT_DIR/{device.txt,*.log}
# PRESET / BATCHES / ROLLOUT_BATCHES / LIMIT_S override the defaults (a CPU dry run:
# PRESET=tiny BATCHES=4,8 ROLLOUT_BATCHES=1,4 bash bench/gpu_suite.sh /tmp/b).
set -u
out=${1:-bench_out}
mkdir -p "$out"
py=${PYTHON:-python3}
preset=${PRESET:-llama32_1b}
limit=${LIMIT_S:-240}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  "$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$out/device.txt"

part() {  # part NAME ARGS...: one bench script under the time limit, output kept
  local name=$1; shift
  echo "== $name: $*" | tee "$out/$name.log"
  timeout "$limit" "$py" "$@" 2>&1 | tee -a "$out/$name.log"
  echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$out/$name.log"
}
part train_step bench/train_step.py --preset "$preset" --dtype bfloat16 \
  --batch "${BATCHES:-32,64,128}" --c 2 --steps 5
part rollout bench/rollout.py --preset "$preset" --dtype bfloat16 \
  --batches "${ROLLOUT_BATCHES:-1,32,256}" --cot-len 60 --c 2,5 --reps 3
