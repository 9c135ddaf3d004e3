#!/usr/bin/env bash
# Shared helpers of the VM bootstrap scripts. Sourced (never executed) by startup_preprocess.sh,
# shutdown_preprocess.sh, download_archives.sh and extract_archives.sh.
#
# Rules kept here for every script:
# - every log line carries a UTC timestamp and goes to stderr (the journal / serial console on the VM) and,
#   once the work disk is mounted, to a log file;
# - instance metadata is fetched into FILES; a value is read back into a variable only to be checked against
#   a strict regular expression, and is then only ever passed as a quoted argument: never eval'd, sourced or
#   interpolated into shell code;
# - JSON markers are written to a temporary name, fsynced and renamed (bootstrap_helpers.py json-update).
# shellcheck shell=bash

shopt -s inherit_errexit
TRIPLET_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TRIPLET_HELPERS="${TRIPLET_LIB_DIR}/bootstrap_helpers.py"
: "${TRIPLET_SYS_PYTHON:=python3}"
: "${TRIPLET_LOG_TAG:=$(basename "${0:-triplet}" .sh)}"
: "${TRIPLET_LOG_FILE:=}"
: "${TRIPLET_RETRY_BASE_S:=2}"
: "${TRIPLET_RETRY_MAX_S:=60}"
: "${GCE_METADATA_HOST:=metadata.google.internal}"
: "${TRIPLET_METADATA_TIMEOUT_S:=5}"

utc_now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# log MESSAGE...: one timestamped line on stderr and in $TRIPLET_LOG_FILE (when set and writable).
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

# Prefix every line of stdin with a timestamp and the tag (for the output of child commands).
# It ignores SIGTERM/SIGINT and ends at EOF: a process group or cgroup being stopped must not cut the pipe
# of a child that is still saving its progress (and logging about it).
stamp_lines() {
  local line
  trap '' TERM INT
  while IFS= read -r line || [[ -n "$line" ]]; do
    log "  | $line"
  done
}

# run_logged CMD...: run CMD with its output stamped into the log; returns CMD's exit status.
# CMD runs in the background and is waited for, so that a trapped SIGTERM is handled at once;
# TRIPLET_CHILD_PID is CMD's own pid meanwhile (a SIGTERM handler forwards the signal to it).
run_logged() {
  local rc=0
  "$@" > >(stamp_lines) 2>&1 &
  TRIPLET_CHILD_PID=$!
  wait "$TRIPLET_CHILD_PID" || rc=$?
  TRIPLET_CHILD_PID=""
  return "$rc"
}

# run_child CMD...: like run_logged for commands that log with timestamps themselves (our own scripts).
run_child() {
  local rc=0
  "$@" &
  TRIPLET_CHILD_PID=$!
  wait "$TRIPLET_CHILD_PID" || rc=$?
  TRIPLET_CHILD_PID=""
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

helper() { "${TRIPLET_SYS_PYTHON}" "${TRIPLET_HELPERS}" "$@"; }

# ------------------------------------------------------------------------------------------ metadata
# meta_fetch PATH OUTFILE: GET http://$GCE_METADATA_HOST/computeMetadata/v1/PATH into OUTFILE.
# Returns 0 found, 1 absent (404), 2 unreachable or other error (after retries).
meta_fetch() {
  local path="$1" out="$2" code tries="${TRIPLET_METADATA_TRIES:-5}" n=1 delay=1
  mkdir -p "$(dirname "$out")"
  while :; do
    code="$(curl -sS -o "${out}.tmp" -w '%{http_code}' --max-time "${TRIPLET_METADATA_TIMEOUT_S}" \
      -H 'Metadata-Flavor: Google' "http://${GCE_METADATA_HOST}/computeMetadata/v1/${path}" 2>/dev/null)" || code="000"
    case "$code" in
      200)
        mv -f "${out}.tmp" "$out"
        return 0
        ;;
      404)
        rm -f "${out}.tmp" "$out"
        return 1
        ;;
    esac
    rm -f "${out}.tmp"
    if ((n >= tries)); then
      return 2
    fi
    sleep "$delay"
    n=$((n + 1))
    delay=$((delay * 2))
  done
}

# meta_attr KEY OUTFILE: an instance attribute (instance/attributes/KEY).
meta_attr() { meta_fetch "instance/attributes/$1" "$2"; }

# read_value FILE: print the file's content with NUL bytes refused (a value is data: only ever compared).
read_value() {
  local v
  if [[ ! -s "$1" ]]; then
    printf ''
    return 0
  fi
  local raw stripped
  raw="$(wc -c <"$1")"
  stripped="$(tr -d '\000' <"$1" | wc -c)"
  [[ "$raw" == "$stripped" ]] || return 1
  v="$(<"$1")"
  printf '%s' "$v"
}

# matches VALUE REGEX: the whole value matches the extended regex and has no control characters.
matches() {
  local value="$1" re="$2"
  [[ "$value" != *[[:cntrl:]]* ]] || return 1
  [[ "$value" =~ $re ]]
}

# ---------------------------------------------------------------------------------------- JSON markers
# marker_update FILE ASSIGNMENT...: key=str key:=json key+=N key@=json, written atomically.
marker_update() { helper json-update "$@" >/dev/null; }
# marker_get FILE KEY [DEFAULT]
marker_get() {
  if (($# > 2)); then
    helper json-get "$1" "$2" --default "$3"
  else
    helper json-get "$1" "$2"
  fi
}

# event NAME MESSAGE [key=str | key:=json]...: one JSON object per line in $TRIPLET_EVENTS_FILE (the structured
# log under /mnt/work/logs/*.jsonl that the Ops Agent ships to Cloud Logging). Best effort.
event() {
  [[ -n "${TRIPLET_EVENTS_FILE:-}" ]] || return 0
  local name="$1" msg="$2"
  shift 2
  helper json-line "$TRIPLET_EVENTS_FILE" severity="${TRIPLET_EVENT_SEVERITY:-INFO}" event="$name" \
    source="${TRIPLET_LOG_TAG}" message="$msg" "$@" 2>/dev/null || true
}

# ------------------------------------------------------------------------------------------ processes
# kill_tree PID SIGNAL: signal every descendant of PID (children first found, then theirs), not PID itself.
kill_tree() {
  local pid="$1" sig="$2" p
  while read -r p; do
    if [[ -n "$p" && "$p" != "$$" ]]; then
      kill "-${sig}" "$p" 2>/dev/null || true
    fi
  done < <(helper descendants "$pid" 2>/dev/null)
}

# wait_gone TIMEOUT_S PID...: poll until none of the PIDs is alive; 1 when some still are.
wait_gone() {
  local timeout="$1" deadline p alive
  shift
  deadline=$((SECONDS + timeout))
  while :; do
    alive=0
    for p in "$@"; do
      if [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; then
        # A zombie (exited, not yet reaped by its parent) counts as gone.
        [[ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" == Z ]] || alive=1
      fi
    done
    ((alive == 0)) && return 0
    ((SECONDS >= deadline)) && return 1
    sleep 0.2
  done
}

# Absolute path of the repository that holds these scripts.
script_repo_root() { (cd "${TRIPLET_LIB_DIR}/../.." && pwd); }
