#!/usr/bin/env bash
# Single-host GPU run: installs jax[cuda12] into .venv once, then runs the command.
#   launch/gpu.sh python -m colar_jax sft --config=configs/base.py:llama32_1b,colar --workdir=runs/x
# All visible GPUs form the mesh (default: data=-1); set --config.mesh.fsdp=-1
# --config.mesh.data=1 to shard parameters instead of replicating them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .venv/.installed-gpu ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -c constraints.txt -e '.[gpu]'
  touch .venv/.installed-gpu
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Latency-hiding scheduler overlaps FSDP all-gathers with compute on multi-GPU hosts.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# Decode-heavy runs (eval, rl): at small batch XLA's dot merger concatenates
# each layer's gate/up weights on every decode step and Triton GEMMs copy the layer's
# weight slice out of the scanned stack. Measured on an H200 (BUILD_NOTES "Benchmarks"):
# both off makes batch-1 decoding 1.37x faster, but a train step 3% slower, so it is on
# only for those entry points; DECODE_FLAGS=1 / 0 forces it on / off.
case "${DECODE_FLAGS:-auto}:$*" in
  1:* | auto:*"colar_jax eval"* | auto:*"colar_jax rl"* | auto:*bench/rollout.py*)
    export XLA_FLAGS="$XLA_FLAGS --xla_disable_hlo_passes=dot-merger --xla_gpu_enable_triton_gemm=false" ;;
esac
[ "${1:-}" = "python" ] && shift
exec .venv/bin/python "$@"
