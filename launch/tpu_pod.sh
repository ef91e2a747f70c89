#!/usr/bin/env bash
# Run colar_jax on every host of a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh create  NAME ZONE ACCELERATOR [VERSION]   # e.g. v5p-32 v2-alpha-tpuv5
#   launch/tpu_pod.sh setup   NAME ZONE                         # copy repo + install on all workers
#   launch/tpu_pod.sh run     NAME ZONE -- python -m colar_jax sft --config=... --workdir=gs://...
#   launch/tpu_pod.sh delete  NAME ZONE
#
# The same command starts on all workers (--worker=all). Each process calls
# jax.distributed.initialize() (TPU VMs expose the coordinator through the
# metadata server, so no address is needed) and the run checks that
# processes x local devices == mesh size before reading data: the classic
# "ran on one host only" hang becomes an immediate error instead.
set -euo pipefail
cmd=${1:?create|setup|run|delete}; name=${2:?TPU name}; zone=${3:?zone}
shift 3 || true
repo_dir=${REPO_DIR:-colar_jax}

case "$cmd" in
  create)
    accel=${1:?accelerator type, e.g. v5p-32}; version=${2:-v2-alpha-tpuv5}
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
      --accelerator-type="$accel" --version="$version"
    ;;
  setup)
    tar czf /tmp/colar_jax_src.tgz --exclude=.venv --exclude=.cache --exclude=.git .
    gcloud compute tpus tpu-vm scp /tmp/colar_jax_src.tgz "$name":/tmp/ --zone="$zone" --worker=all
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
      set -e; mkdir -p $repo_dir && tar xzf /tmp/colar_jax_src.tgz -C $repo_dir && cd $repo_dir &&
      python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]' &&
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    ;;
  run)
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || { echo "run: give the command after --" >&2; exit 2; }
    # --config.distributed.initialize=true: every worker joins the same job.
    user_cmd=$(printf '%q ' "$@")
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
      cd $repo_dir && source .venv/bin/activate &&
      $user_cmd --config.distributed.initialize=true 2>&1 | tee -a run_\$(hostname).log"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
