#!/usr/bin/env bash
# Shared bash of the bootstrap scripts and gcp/provision*.sh. Sourced, never executed.
#
# - One log format for the whole project: "<UTC time>Z <tag>[<pid>]: [WARNING: |ERROR: ]message" on stderr
#   (the journal, the serial console) and, once the work disk is mounted, in $TRIPLET_LOG_FILE. The Python
#   side writes the same lines (building_image_triplet_model/progress.py).
# - Values from instance metadata are read by Python (building_image_triplet_model/vm/settings.py), checked
#   against strict patterns, and only ever passed on as quoted arguments: never eval'd or sourced.
# shellcheck shell=bash

shopt -s inherit_errexit
TRIPLET_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TRIPLET_SCRIPTS_REPO="$(cd "$TRIPLET_LIB_DIR/../.." && pwd)" # the repository these scripts belong to
: "${TRIPLET_LOG_TAG:=$(basename "${0:-triplet}" .sh)}"
: "${TRIPLET_LOG_FILE:=}"
: "${TRIPLET_RETRY_BASE_S:=2}"
: "${TRIPLET_RETRY_MAX_S:=60}"
: "${TRIPLET_SYS_PYTHON:=python3}"

utc_now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# log MESSAGE...: one line on stderr and in $TRIPLET_LOG_FILE (when set and writable).
log() {
  local line
  line="$(utc_now) ${TRIPLET_LOG_TAG}[$$]: $*"
  printf '%s\n' "$line" >&2
  if [[ -n "${TRIPLET_LOG_FILE}" ]]; then
    printf '%s\n' "$line" >>"${TRIPLET_LOG_FILE}" 2>/dev/null || true
  fi
}
warn() { log "WARNING: $*"; }
die() {
  log "ERROR: $*"
  exit "${TRIPLET_DIE_CODE:-1}"
}

# Prefix every line of stdin with the log's timestamp and tag (the output of child commands). It ignores
# SIGTERM/SIGINT and ends at EOF: a stopping cgroup must not cut the pipe of a child still saving progress.
stamp_lines() {
  local line
  trap '' TERM INT
  while IFS= read -r line || [[ -n "$line" ]]; do
    log "  | $line"
  done
}

# run_logged CMD...: run CMD in the background (a trapped SIGTERM is handled at once; TRIPLET_CHILD_PID is
# its pid meanwhile). Its output is kept and shown only when it fails: a package install says nothing
# unless something went wrong. Returns CMD's exit status.
run_logged() {
  local rc=0 out
  out="$(mktemp)"
  "$@" >"$out" 2>&1 &
  TRIPLET_CHILD_PID=$!
  wait "$TRIPLET_CHILD_PID" || rc=$?
  TRIPLET_CHILD_PID=""
  if ((rc != 0)); then
    warn "$1 failed (exit $rc):"
    tail -n 40 "$out" | stamp_lines
  fi
  rm -f "$out"
  return "$rc"
}

# retry ATTEMPTS CMD...: exponential backoff from TRIPLET_RETRY_BASE_S, capped at TRIPLET_RETRY_MAX_S.
retry() {
  local attempts="$1" n=1 delay="${TRIPLET_RETRY_BASE_S}" rc=0
  shift
  while :; do
    rc=0
    "$@" || rc=$?
    if ((rc == 0)); then return 0; fi
    if ((n >= attempts)); then
      warn "giving up after ${n} attempts (exit ${rc}): $*"
      return "$rc"
    fi
    warn "attempt ${n}/${attempts} failed (exit ${rc}), retrying in ${delay}s: $*"
    sleep "$delay"
    n=$((n + 1))
    delay=$((delay * 2))
    if ((delay > TRIPLET_RETRY_MAX_S)); then delay="${TRIPLET_RETRY_MAX_S}"; fi
  done
}

# matches VALUE REGEX: the whole value matches the extended regex and has no control characters.
matches() {
  local value="$1" re="$2"
  [[ "$value" != *[[:cntrl:]]* ]] || return 1
  [[ "$value" =~ $re ]]
}

is_true() { [[ "${1,,}" =~ ^(1|true|yes|on)$ ]]; }

# The project's Python: `sysvm` with Debian's python3 (before uv sync: standard-library modules only),
# `vm` with the project's environment. `vm_cmd` puts vm's command line in the array VM_CMD, for callers
# that start it in the background or exec it: a backgrounded shell function would run in a subshell, which
# resets trapped signals, so a SIGTERM sent to its pid would kill the subshell and never reach Python.
sysvm() { PYTHONPATH="${TRIPLET_SCRIPTS_REPO}" "${TRIPLET_SYS_PYTHON}" -m "building_image_triplet_model.$1" "${@:2}"; }
vm_cmd() {
  VM_CMD=(env "PYTHONPATH=${TRIPLET_REPO_DIR:-$TRIPLET_SCRIPTS_REPO}${PYTHONPATH:+:$PYTHONPATH}"
    "${TRIPLET_PYTHON:-$TRIPLET_SCRIPTS_REPO/.venv/bin/python}" -m "building_image_triplet_model.$1" "${@:2}")
}
vm() {
  local -a VM_CMD
  vm_cmd "$@"
  "${VM_CMD[@]}"
}

# load_paths: the VM's folders (building_image_triplet_model/vm/paths.py, the one table) as variables.
load_paths() {
  local line key
  while IFS= read -r line; do
    key="${line%%=*}"
    [[ "$key" =~ ^TRIPLET_[A-Z_]+$ ]] || continue
    printf -v "$key" '%s' "${line#*=}"
    export "${key?}"
  done < <(sysvm vm.paths)
}

# kill_tree PID SIGNAL: signal every descendant of PID, deepest last found first.
kill_tree() {
  local pid="$1" sig="$2" child
  for child in $(pgrep -P "$pid" 2>/dev/null || true); do
    kill_tree "$child" "$sig"
    kill "-${sig}" "$child" 2>/dev/null || true
  done
}

# wait_gone TIMEOUT_S PID...: poll until none of the PIDs is alive (a zombie counts as gone); 1 if some are.
wait_gone() {
  local timeout="$1" deadline p alive
  shift
  deadline=$((SECONDS + timeout))
  while :; do
    alive=0
    for p in "$@"; do
      if [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; then
        [[ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" == Z ]] || alive=1
      fi
    done
    ((alive == 0)) && return 0
    ((SECONDS >= deadline)) && return 1
    sleep 0.2
  done
}
