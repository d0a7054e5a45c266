# Sourced by the device scripts (gpu_detectron2_parity.sh, gpu_host_path.sh): steps time-boxed so that a
# whole script stays inside one device call. The caller sets DEADLINE_S (seconds for the whole) and
# T0=$(date +%s) before sourcing; with STEP_LOG_DIR set, a step's output goes to STEP_LOG_DIR/NAME.log
# (its last 3 lines shown), else to the caller's output.

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE_S - $(date +%s) + T0 )); }
# budget WANT RESERVE: seconds for a step that wants WANT and must leave RESERVE for the steps after it
budget() { local b=$(( $(left) - $2 )); (( b > $1 )) && b=$1; echo $b; }
# step NAME SECONDS CMD...: runs CMD under timeout, logs its exit status
step() {
  local name=$1 limit=$2 rc; shift 2
  if (( limit < 15 )); then echo "[$(elapsed) s] == $name: skipped (only ${limit} s left)"; return 124; fi
  echo "[$(elapsed) s] == $name (limit ${limit} s): $*"
  if [ -n "${STEP_LOG_DIR:-}" ]; then
    timeout -k 10 "$limit" "$@" > "$STEP_LOG_DIR/$name.log" 2>&1
    rc=$?
    tail -n 3 "$STEP_LOG_DIR/$name.log"
  else
    timeout -k 10 "$limit" "$@"
    rc=$?
  fi
  echo "[$(elapsed) s] == $name: exit $rc$( ((rc == 124)) && echo ' (timed out)')"
  return $rc
}
