#!/usr/bin/env bash
# SmolLM2-135M-Instruct + GSM8k (configs/smollm2_gsm8k.py) on a bare GPU host: JAX
# preinstalled, no internet, the tree (<= 64 MiB a transfer) as the only input.
#
#   bash launch/gpu_gsm8k.sh split [GGUF]        # HERE, once: .gguf_parts/gguf.part{1,2}
#   bash launch/gpu_gsm8k.sh park                # GPU call 1: keep part 1 in $PARK
#   bash launch/gpu_gsm8k.sh part1|part2|quick   # GPU call 2: reassemble, check, run
#
# The GGUF (98,362,432 bytes) does not fit one transfer beside the tree (7.6 MB) and the
# wheels (11 MB), so it travels in two parts over two back-to-back calls: call 1 carries
# part 1 and parks it in /tmp (the host keeps it while it stays up, 30 s after a call);
# call 2 carries part 2 and the wheels, and this script concatenates the parts and checks
# the sha256 of each part and of the whole file (launch/smollm2.sha256) BEFORE anything
# else runs. The weights are the GGUF's own bytes: nothing is re-quantized.
#
# Then: the wheels the image lacks (.whl/, listed in BUILD_NOTES) go to /tmp/site with
# pip --no-index --no-deps (the image's jax 0.11.2 / flax 0.12.10 stay; our pyproject's
# jax<0.11 pin is not applied: the package runs from the tree via PYTHONPATH), the GGUF
# is converted (models/smollm2), and `demo` runs the part's phases (the line-up is split
# in two windows, each printing its own rows: PARTS in the config file). Results go to
# $OUT (or the second argument): results.md, results.json, accuracy_vs_L.png, log.txt,
# evals.tgz (every phase's eval JSON and JSONL).
#
# DRY_RUN=1 prints each command instead of running it. LIMIT_S (default 570) bounds the
# demo so results still come back inside a 10-minute call.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS_DIR=${PARTS_DIR:-.gguf_parts}
PARK=${PARK:-/tmp/colar_park}
SUMS=${SUMS:-launch/smollm2.sha256}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PART1_BYTES=${PART1_BYTES:-54525952} # 52 MiB: call 1 = tree + part 1, call 2 = tree + wheels + part 2
PY=${PYTHON:-python3}

run() { # prints (DRY_RUN=1) or runs one command
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

die() {
  echo "gpu_gsm8k: $*" >&2
  exit 1
}

part_phases() {
  case "$1" in
    part1) echo "cot,colar,rl" ;;
    part2) echo "cot,nocot,icot,coconut,distill" ;;
    quick) echo "" ;;
    *) die "unknown part '$1' (part1 | part2 | quick)" ;;
  esac
}

find_part1() { # part 1 is parked by call 1, or here beside part 2 (a local rehearsal)
  if [ -f "$PARK/gguf.part1" ]; then
    echo "$PARK/gguf.part1"
  elif [ -f "$PARTS_DIR/gguf.part1" ]; then
    echo "$PARTS_DIR/gguf.part1"
  else
    die "GGUF part 1 is neither in $PARK (call 1 parks it; the host goes back 30 s after a call, so call 2 must follow at once) nor in $PARTS_DIR: run call 1 again"
  fi
}

check_sum() { # check_sum FILE NAME: FILE's sha256 is NAME's line of $SUMS
  local want got
  want=$(awk -v n="$2" '$2 == n {print $1}' "$SUMS")
  [ -n "$want" ] || die "$SUMS has no line for $2"
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$want" ] || die "$1: sha256 $got, expected $want ($2): a broken transfer; send it again"
  echo "sha256 ok: $2"
}

cmd=${1:-}
case "$cmd" in
  split)
    src=${2:-.cache/smollm2/$GGUF_NAME}
    [ -f "$src" ] || die "no GGUF at $src"
    if [ "${DRY_RUN:-0}" = 1 ]; then
      echo "head -c $PART1_BYTES $src > $PARTS_DIR/gguf.part1"
      echo "tail -c +$((PART1_BYTES + 1)) $src > $PARTS_DIR/gguf.part2"
    else
      mkdir -p "$PARTS_DIR"
      head -c "$PART1_BYTES" "$src" >"$PARTS_DIR/gguf.part1"
      tail -c +"$((PART1_BYTES + 1))" "$src" >"$PARTS_DIR/gguf.part2"
      {
        echo "$(sha256sum "$src" | cut -d' ' -f1) $GGUF_NAME"
        echo "$(sha256sum "$PARTS_DIR/gguf.part1" | cut -d' ' -f1) gguf.part1"
        echo "$(sha256sum "$PARTS_DIR/gguf.part2" | cut -d' ' -f1) gguf.part2"
      } >"$SUMS.new"
      if [ -f "$SUMS" ] && ! cmp -s "$SUMS" "$SUMS.new"; then
        rm -f "$SUMS.new"
        die "$src does not give the parts $SUMS records (another file or PART1_BYTES?)"
      fi
      mv "$SUMS.new" "$SUMS"
      ls -l "$PARTS_DIR"
    fi
    ;;
  park)
    [ -f "$PARTS_DIR/gguf.part1" ] || die "no $PARTS_DIR/gguf.part1 (carry it: carry=[\"$PARTS_DIR/gguf.part1\"])"
    check_sum "$PARTS_DIR/gguf.part1" gguf.part1
    run mkdir -p "$PARK"
    run cp "$PARTS_DIR/gguf.part1" "$PARK/gguf.part1"
    echo "parked part 1 in $PARK; now call 2 (part 2 + .whl), at once"
    ;;
  part1 | part2 | quick)
    phases=$(part_phases "$cmd")
    out=${2:-${OUT:-results_out}}
    run mkdir -p "$out"
    # 1. The weights, reassembled and checked before anything runs.
    gguf=${GGUF:-/tmp/colar_gguf/$GGUF_NAME}
    if [ ! -f "$gguf" ]; then
      p1=$(find_part1)
      [ -f "$PARTS_DIR/gguf.part2" ] || die "no $PARTS_DIR/gguf.part2 (carry it with call 2)"
      check_sum "$p1" gguf.part1
      check_sum "$PARTS_DIR/gguf.part2" gguf.part2
      run mkdir -p "$(dirname "$gguf")"
      if [ "${DRY_RUN:-0}" = 1 ]; then
        echo "cat $p1 $PARTS_DIR/gguf.part2 > $gguf"
      else
        cat "$p1" "$PARTS_DIR/gguf.part2" >"$gguf.tmp"
        mv "$gguf.tmp" "$gguf"
      fi
    fi
    [ "${DRY_RUN:-0}" = 1 ] || check_sum "$gguf" "$GGUF_NAME"
    # 2. The wheels the image lacks, beside (not over) its packages; the package from the tree.
    if compgen -G ".whl/*.whl" >/dev/null; then
      run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    fi
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 COLAR_DATA="$PWD/data"
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
    # The pipeline is mostly decoding: launch/gpu.sh's decode flags (1.14-1.38x faster
    # rollouts on an H200, a train step 3% slower; BUILD_NOTES "Benchmarks"). DECODE_FLAGS=0: off.
    if [ "${DECODE_FLAGS:-1}" = 1 ]; then
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_disable_hlo_passes=dot-merger --xla_gpu_enable_triton_gemm=false"
    fi
    run "$PY" -c "import jax, flax, colar_jax.cli; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
    # 3. Conversion (once per host), then the part's phases.
    models=${MODELS:-models/smollm2}
    if [ ! -f "$models/config.json" ]; then
      run "$PY" -m colar_jax convert hf-to-orbax "$gguf" "$models"
    fi
    args=(-m colar_jax demo --config=configs/smollm2_gsm8k.py --workdir="${WORKDIR:-runs/smollm2}"
      --jax_cache_dir="${JAX_CACHE:-/tmp/colar_jax_cache}" --no_progress
      --config.model.hf_dir="$models")
    if [ -n "$phases" ]; then args+=(--phases="$phases"); fi
    if [ "$cmd" = quick ]; then args+=(--quick); fi
    export COLAR_PART=$cmd
    set +e
    if [ "${DRY_RUN:-0}" = 1 ]; then
      run timeout "${LIMIT_S:-570}" "$PY" "${args[@]}" "${@:3}"
      rc=0
    else
      timeout "${LIMIT_S:-570}" "$PY" "${args[@]}" "${@:3}" 2>&1 | tee "$out/log.txt"
      rc=${PIPESTATUS[0]}
    fi
    set -e
    # 4. What comes back (8 files of <= 16 MiB at most): the table, the plot, the log and
    # every phase's evaluation, also after a timeout.
    wd=${WORKDIR:-runs/smollm2}
    for f in results.md results.json accuracy_vs_L.png; do
      if [ -f "$wd/$f" ]; then run cp "$wd/$f" "$out/"; fi
    done
    if [ -d "$wd" ]; then
      mapfile -t keep < <(cd "$wd" && find . -type f \( -path '*/eval/*' -o -name demo_stamp.json \
        -o -name metrics.jsonl -o -name config.json \) -not -path './data/*' | sort)
      if [ "${#keep[@]}" -gt 0 ]; then run tar -czf "$out/evals.tgz" -C "$wd" "${keep[@]}"; fi
    fi
    echo "gpu_gsm8k: $cmd exit $rc; results in $out"
    exit "$rc"
    ;;
  *)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac
