#!/usr/bin/env bash
# Issue #18's host-path measurements in one command, on a bare GPU machine (one H200, 16 cores), time-boxed so
# that the whole stays under DEADLINE_S (default 560 s) of one device call:
#
#   1. installs the missing Python packages from wheels in .whl/ (scripts/device_wheels.sh makes them) into
#      /tmp/site (no network) and prints the versions;
#   2. the GPU tests of the engines and the worker (TESTS=0 leaves them out);
#   3. scripts/bench_decode.py: one RGB-D frame's decode, whole and in parts;
#   4. scripts/bench_serve.py: JPEG + PNG as OpenCV and as the client library write them, concurrency 1 and 64,
#      the server's default frontends, with the server's CPU by thread; VARIANTS adds served configurations
#      (bench_serve's --variant, separated by ';', e.g. VARIANTS='bsync={"blocking_sync": true};nice5=--frontend-nice=5');
#   5. scripts/bench_client_shm.py: KServe with client shared memory at concurrency 1;
#   6. scripts/bench_startup.py: start to SERVING, fresh and warm caches;
#   7. scripts/profile_worker.py (only when STEPS names it): the worker's batch in-process, its host time
#      by phase, with ENGINE_OPTIONS blocking_sync so that its CPU time is its own work.
# STEPS picks and orders the steps (default: "gpu_tests decode serve client_shm startup"); ENCODINGS, CONC and
# FRONTENDS override the serve step's encodings, concurrencies and frontend counts (0: the server's default).
# Each step gets at most what it wants, less what the steps after it need at least (MIN_S below).
# THREAD_STATES=SECONDS: the serve step also takes py-spy dumps of the server at the highest concurrency,
# that many seconds apart (scripts/thread_states.py: which threads hold the GIL, wait for it, or sleep).
# STARTUP_KILL=1: the startup step also kills the worker under load and times its return (bench_startup.py).
# STARTUP_VARIANT=NAME=FLAGS: the startup step also starts with these serve flags (bench_startup.py --variant).
# CONNECTIONS: each client process's TCP connections, several loaded one after another (bench_serve --connections;
# default 0: the client library's).
# THREAD_STACKS=SECONDS: the serve step also records one frontend and one worker with py-spy for that many seconds
# at the highest concurrency (scripts/thread_stacks.py: where each thread's samples were, and GIL waits).
# Everything lands in $OUT/host_path.tgz (logs, JSON, tables, pictures) and $OUT/summary.md (the tables).
#
# On the GPU machine, from the repository root (carry .whl):
#   bash scripts/gpu_host_path.sh
# CPU smoke test of the same steps (torchvision engine, tiny frames; GPU tests left out):
#   SMOKE=1 OUT=/tmp/hp bash scripts/gpu_host_path.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/host-path-out}
SMOKE=${SMOKE:-0}
TESTS=${TESTS:-1}
PY=${PY:-python3}
WHL=${WHL:-.whl}
SITE=${SITE:-/tmp/site}
VARIANTS=${VARIANTS:-}
STEPS=${STEPS:-gpu_tests decode serve client_shm startup}
ENCODINGS=${ENCODINGS:-jpeg+png jpeg+png-lib}
FRONTENDS=${FRONTENDS:-0}
THREAD_STATES=${THREAD_STATES:-0}
THREAD_STACKS=${THREAD_STACKS:-0}
CONNECTIONS=${CONNECTIONS:-0}
DEADLINE_S=${DEADLINE_S:-560}
RES=$(mktemp -d /tmp/host-path-XXXX)
mkdir -p "$OUT"
T0=$(date +%s)

STEP_LOG_DIR=$RES
source scripts/timebox.sh  # elapsed, left, budget, step (its output in $RES/NAME.log)

main() {
  echo "gpu_host_path.sh: SMOKE=$SMOKE TESTS=$TESTS DEADLINE_S=$DEADLINE_S; $(nproc) cores; $(date -u +%FT%TZ)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  if compgen -G "$WHL/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
      || return 1
    export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH"
  else
    export PYTHONPATH="$PWD"
  fi
  "$PY" -c "import sys, torch, grpc, google.protobuf, zmq, cv2, isal, numpy
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'grpc', grpc.__version__,
      'protobuf', google.protobuf.__version__, 'zmq', zmq.__version__, 'cv2', cv2.__version__, 'isal', isal.__version__,
      'numpy', numpy.__version__)" | tee "$RES/versions.txt" || return 1

  # The machine's CPU each second (its st column: time the hypervisor gave this VM's cores to others).
  local vmstat_pid=""
  command -v vmstat >/dev/null && { vmstat -n -t 1 > "$RES/vmstat.log" 2>&1 & vmstat_pid=$!; }
  local engine=(--engine fast) size=() serve_extra=(--batch 16 --engine-batches 16 --client-procs 4 --seconds 4)
  local startup=(--engine fast --models r50 $([ "${STARTUP_KILL:-0}" = 1 ] || echo --no-kill)) shm=(--engine fast --requests 150) conc=(${CONC:-1 64})
  local worker=(--batches 16 --seconds 3)
  if [ "$SMOKE" = 1 ]; then
    engine=(--engine torchvision --arch small --device cpu)
    size=(--height 96 --width 128 --min-size 96 --detections 5)
    serve_extra=(--batch 2 --engine-batches 2 --seconds 0.5 --frames 2)
    startup=(--engine torchvision --arch small --device cpu --height 96 --width 128 --min-size 96 --models r50 --no-kill)
    shm=(--engine null --requests 5 --height 96 --width 128)
    conc=(1 2)
    worker=(--device cpu --arch small --height 96 --width 128 --min-size 96 --detections 5 --batches 2 --seconds 0.5)
  fi
  [ -n "${STARTUP_VARIANT:-}" ] && startup+=(--variant "$STARTUP_VARIANT")
  local variants=()
  IFS=';' read -ra parts <<< "$VARIANTS"
  for v in "${parts[@]}"; do [ -n "$v" ] && variants+=(--variant "$v"); done

  local encodings=($ENCODINGS) frontends=($FRONTENDS)
  declare -A MIN_S=([gpu_tests]=90 [decode]=40 [serve]=100 [client_shm]=40 [startup]=60 [worker]=45)
  local todo=($STEPS)
  for ((k = 0; k < ${#todo[@]}; k++)); do
    local name=${todo[k]} later=0
    for rest in "${todo[@]:k+1}"; do later=$((later + ${MIN_S[$rest]:-0})); done
    case $name in
      gpu_tests)
        if [ "$TESTS" = 1 ] && [ "$SMOKE" != 1 ]; then
          step gpu_tests "$(budget 90 $later)" "$PY" -m pytest -p no:cacheprovider -q -o addopts="" -m gpu --timeout 80 \
            tests/unit/engines tests/unit/worker
        fi ;;
      decode)
        step decode "$(budget 60 $later)" "$PY" scripts/bench_decode.py --rounds 3 --iters 20 \
          $([ "$SMOKE" = 1 ] && echo --width 128 --height 96 --rounds 1 --iters 2) ;;
      serve)
        step serve "$(budget 240 $later)" "$PY" scripts/bench_serve.py "${engine[@]}" "${size[@]}" "${serve_extra[@]}" \
          --frontends "${frontends[@]}" --encodings "${encodings[@]}" --concurrency "${conc[@]}" --no-baseline "${variants[@]}" \
          --thread-states "$THREAD_STATES" --thread-stacks "$THREAD_STACKS" --connections $CONNECTIONS --out "$RES/serve" ;;
      client_shm)
        step client_shm "$(budget 70 $later)" "$PY" scripts/bench_client_shm.py "${shm[@]}" ;;
      startup)
        step startup "$(budget 150 $later)" "$PY" scripts/bench_startup.py "${startup[@]}" --out "$RES/startup" ;;
      worker)
        step worker "$(budget 150 $later)" "$PY" scripts/profile_worker.py "${worker[@]}" \
          --fast-options '{"blocking_sync": true}' --out "$RES/worker" ;;
      *) echo "unknown step $name (gpu_tests decode serve client_shm startup worker)"; return 1 ;;
    esac
  done

  [ -n "$vmstat_pid" ] && kill "$vmstat_pid" 2>/dev/null
  {
    echo "# gpu_host_path.sh, $(date -u +%FT%TZ), $(nproc) cores"; echo; cat "$RES/versions.txt"; echo
    for f in decode.log serve/serve.md client_shm.log startup/startup.md worker.log; do
      [ -f "$RES/$f" ] && { echo "## $f"; echo; cat "$RES/$f"; echo; }
    done
  } > "$OUT/summary.md"
  tar -czf "$OUT/host_path.tgz" -C "$RES" .
  echo "[$(elapsed) s] wrote $OUT/summary.md and $OUT/host_path.tgz"
}

main 2>&1 | tee "$OUT/run.log"
