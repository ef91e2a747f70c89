#!/usr/bin/env bash
# Run colar_jax on every host of a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh create NAME ZONE ACCELERATOR [VERSION]  # e.g. v5p-32; VERSION from the generation
#   launch/tpu_pod.sh setup  NAME ZONE                        # ship the repo, Python 3.11, pip install
#   launch/tpu_pod.sh run    NAME ZONE [--job JOB] -- python -m colar_jax sft --config=... --workdir=gs://...
#   launch/tpu_pod.sh status NAME ZONE [--job JOB]            # each worker's exit status + log tail
#   launch/tpu_pod.sh stop   NAME ZONE [--job JOB]            # kill the job on every worker
#   launch/tpu_pod.sh delete NAME ZONE
#
# DRY_RUN=1 prints every command (gcloud, and the local tar of `setup`) instead of running it.
#
# The runtime version follows the TPU generation (Cloud TPU's table for JAX): v4 and older
# tpu-ubuntu2204-base, v5e (v5litepod-*) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e
# v2-alpha-tpuv6e. All four images are Ubuntu 22.04, whose Python is 3.10; the package needs
# >= 3.11, so `setup` installs python3.11 from the deadsnakes PPA when the image lacks it and
# builds .venv with it.
#
# `setup` ships the files git tracks (`git ls-files`): never runs/, models/, data or .venv.
# `run` starts the same command DETACHED on all workers (nohup; it survives a closed laptop):
# one log per worker in ~/$REPO_DIR/logs/JOB.<host>.log and its exit status in
# logs/JOB.<host>.exit. Training commands (`colar_jax sft|rl`) get
# --config.distributed.initialize=true, so every worker joins one job (TPU VMs expose the
# coordinator through the metadata server); other commands are run as given. The run checks
# that processes x local devices == mesh size before reading data.
set -euo pipefail
cmd=${1:?create|setup|run|status|stop|delete}
name=${2:?TPU name}
zone=${3:?zone}
shift 3 || true
repo_dir=${REPO_DIR:-colar_jax}
job=job

# Runs (or, with DRY_RUN=1, prints) one command.
x() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *)
      echo "error: accelerator $1: unknown TPU generation (v4-*, v5litepod-*, v5p-*, v6e-*);" \
        "pass the runtime VERSION explicitly" >&2
      return 2
      ;;
  esac
}

ssh_all() {
  x gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}

parse_job() {
  if [ "${1:-}" = "--job" ]; then
    job=${2:?--job needs a name}
    shift 2
  fi
  rest=("$@")
}

case "$cmd" in
  create)
    accel=${1:?accelerator type, e.g. v5p-32}
    version=${2:-$(runtime_version "$accel")}
    x gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
      --accelerator-type="$accel" --version="$version"
    ;;
  setup)
    tarball=/tmp/colar_jax_src.tgz
    if [ "${DRY_RUN:-0}" = 1 ]; then
      echo "git ls-files -z | tar --null -czf $tarball -T -"
    else
      git ls-files -z | tar --null -czf "$tarball" -T -
    fi
    x gcloud compute tpus tpu-vm scp "$tarball" "$name":/tmp/ --zone="$zone" --worker=all
    ssh_all "set -e
      if ! command -v python3.11 >/dev/null; then
        sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -q &&
        sudo apt-get install -y -q python3.11 python3.11-venv
      fi
      mkdir -p $repo_dir && tar xzf $tarball -C $repo_dir && cd $repo_dir &&
      python3.11 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]' &&
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    ;;
  run)
    parse_job "$@"
    set -- "${rest[@]}"
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || {
      echo "error: run: give the command after --" >&2
      exit 2
    }
    user_cmd=$(printf '%q ' "$@")
    # Only the trainers start jax.distributed (the other commands run per host).
    if [[ " $* " =~ " colar_jax "(sft|rl)" " ]]; then
      user_cmd+="--config.distributed.initialize=true"
    fi
    log="logs/$job.\$(hostname)"
    ssh_all "cd $repo_dir && mkdir -p logs && source .venv/bin/activate &&
      nohup bash -c '$user_cmd; echo \$? > $log.exit' > $log.log 2>&1 < /dev/null &
      echo started $job on \$(hostname): $repo_dir/$log.log"
    ;;
  status)
    parse_job "$@"
    ssh_all "cd $repo_dir && for h in logs/$job.*.log; do
      s=\${h%.log}.exit; echo \"== \$h: \$( [ -f \$s ] && echo exit \$(cat \$s) || echo running)\";
      tail -n 3 \$h; done"
    ;;
  stop)
    parse_job "$@"
    # The pod runs one job at a time: stop every colar_jax process (the job's wrapper
    # shell then records the exit status of the killed command).
    ssh_all "pkill -f 'python -m colar_jax' || true"
    ;;
  delete)
    x gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    ;;
  *)
    echo "error: unknown command $cmd (create|setup|run|status|stop|delete)" >&2
    exit 2
    ;;
esac
