#!/usr/bin/env bash
# Shutdown script (the `shutdown-script-url` object; google-shutdown-scripts.service runs it when the guest
# stops). Best effort, inside the 30 s a Spot VM gets between ACPI soft-off and power-off:
#
#   1. decide whether a shutdown is really under way: instance/preempted is TRUE, or systemd is stopping, or
#      TRIPLET_ASSUME_SHUTDOWN=1. Otherwise (reinstalling or upgrading the guest agent runs this script on a
#      LIVE VM) it changes nothing and exits 0;
#   2. SIGTERM the job (its systemd unit, and the pids in /run/triplet) and give it at most
#      TRIPLET_SHUTDOWN_GRACE_S (15) seconds to make its progress durable;
#   3. count the preemption and push the small files (markers, logs) within TRIPLET_SHUTDOWN_PUSH_TIMEOUT_S
#      (10) seconds: python -m building_image_triplet_model.vm shutdown. Big files went with the pushes.
# shellcheck disable=SC2153 # the TRIPLET_* folders come from load_paths (building_image_triplet_model/vm/paths.py)
set -Eeuo pipefail
SELF_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$SELF_DIR/lib.sh" ]]; then
  # Run alone from metadata: use the checkout's copy, or stage 0's.
  for copy in "${TRIPLET_REPO_DIR:-/mnt/work/repo}/gcp/scripts" "${TRIPLET_BOOTSTRAP_DIR:-/var/lib/triplet/bootstrap}/gcp/scripts"; do
    if [[ -f "$copy/lib.sh" && -f "$copy/shutdown_preprocess.sh" ]]; then
      exec bash "$copy/shutdown_preprocess.sh" "$@"
    fi
  done
  echo "shutdown_preprocess: the bootstrap never ran on this VM: nothing to do" >&2
  exit 0
fi
# shellcheck source=gcp/scripts/lib.sh
source "$SELF_DIR/lib.sh"
TRIPLET_LOG_TAG=shutdown_preprocess
load_paths
: "${TRIPLET_UNIT:=triplet-preprocess}"
: "${TRIPLET_SYSTEMCTL:=systemctl}"
: "${TRIPLET_PYTHON:=${TRIPLET_REPO_DIR}/.venv/bin/python}"
: "${TRIPLET_SHUTDOWN_GRACE_S:=15}"
: "${TRIPLET_SHUTDOWN_PUSH_TIMEOUT_S:=10}"
: "${TRIPLET_ASSUME_SHUTDOWN:=0}"

# ------------------------------------------------------------------------------ is a shutdown under way?
preempted=UNKNOWN
if [[ "${TRIPLET_METADATA:-required}" != off ]]; then
  preempted="$(curl -sf --max-time 2 --retry 1 -H 'Metadata-Flavor: Google' \
    "http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1/instance/preempted" 2>/dev/null || echo UNKNOWN)"
  matches "$preempted" '^[A-Z]{1,10}$' || preempted=UNKNOWN
fi
system_state="$("$TRIPLET_SYSTEMCTL" is-system-running 2>/dev/null || true)"
reason=""
if [[ "$preempted" == TRUE ]]; then
  reason=preempted
elif [[ "$system_state" == stopping || "$TRIPLET_ASSUME_SHUTDOWN" == 1 ]]; then
  reason=shutdown
fi
if [[ -z "$reason" ]]; then
  # A live VM: touch nothing, not even a log file.
  log "no shutdown under way (preempted=${preempted}, system ${system_state:-unknown}): nothing to do"
  exit 0
fi
if [[ -d "$TRIPLET_LOG_DIR" ]]; then
  TRIPLET_LOG_FILE="$TRIPLET_LOG_DIR/$(date -u +%Y%m%dT%H%M%SZ)-$$-shutdown.log"
  export TRIPLET_LOG_FILE
fi
log "shutdown under way (${reason}; preempted=${preempted}, system ${system_state:-unknown})"

# ------------------------------------------------------------------------------------------- stop the job
# A pid file names a process only while /proc says it still runs our command (pids get reused).
pid_of() {
  local file="$TRIPLET_RUN_DIR/$1" pid
  [[ -f "$file" ]] || return 1
  pid="$(<"$file")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE -- "$2" || return 1
  printf '%s' "$pid"
}

pids=()
if [[ -d /run/systemd/system ]] && "$TRIPLET_SYSTEMCTL" is-active --quiet "$TRIPLET_UNIT.service" 2>/dev/null; then
  log "SIGTERM to $TRIPLET_UNIT.service"
  "$TRIPLET_SYSTEMCTL" kill --signal=SIGTERM --kill-whom=main "$TRIPLET_UNIT.service" 2>/dev/null || true
fi
# The job forwards SIGTERM to the engine once (a second one would make the engine exit without saving);
# the engine is signalled directly only when no job is left.
for name in job startup; do
  if p="$(pid_of "$name.pid" 'startup_preprocess|building_image_triplet_model.vm')"; then
    log "SIGTERM to the $name (pid $p)"
    kill -TERM "$p" 2>/dev/null || true
    pids+=("$p")
  fi
done
if p="$(pid_of engine.pid '-m building_image_triplet_model')"; then
  ((${#pids[@]})) || { log "SIGTERM to the engine (pid $p)"; kill -TERM "$p" 2>/dev/null || true; }
  pids+=("$p")
fi
if ((${#pids[@]})); then
  if wait_gone "$TRIPLET_SHUTDOWN_GRACE_S" "${pids[@]}"; then
    log "the job stopped"
  else
    warn "still running after ${TRIPLET_SHUTDOWN_GRACE_S}s; its completed work is on disk anyway"
  fi
else
  log "no preprocessing job running"
fi

# -------------------------------------------------------------------------------- count, then push
if [[ ! -d "$TRIPLET_MOUNT_WORK" || ! -x "$TRIPLET_PYTHON" ]]; then
  log "no work disk or environment here: nothing to push"
  exit 0
fi
timeout --kill-after=2 "$TRIPLET_SHUTDOWN_PUSH_TIMEOUT_S" \
  env PYTHONPATH="$TRIPLET_REPO_DIR" "$TRIPLET_PYTHON" -m building_image_triplet_model.vm shutdown "$reason" ||
  warn "counting or pushing failed or timed out"
exit 0
