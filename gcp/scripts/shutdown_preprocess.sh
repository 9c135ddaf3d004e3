#!/usr/bin/env bash
# Shutdown script (the `shutdown-script` metadata key; google-shutdown-scripts.service runs it when the guest
# stops). Best effort, and inside the 30 s a spot VM gets between ACPI soft-off and power-off:
#
#   1. decide whether a shutdown is really under way: instance/preempted is TRUE, or systemd is stopping,
#      or TRIPLET_ASSUME_SHUTDOWN=1. Otherwise (the guest agent being reinstalled or upgraded runs this
#      script on a LIVE VM) it changes nothing and exits 0;
#   2. SIGTERM the preprocessing job (its systemd unit, and the pids recorded in /run/triplet) and give it at
#      most TRIPLET_SHUTDOWN_GRACE_S (15) seconds to make its progress durable;
#   3. count the preemption in state/preemptions.json;
#   4. push the small files (state markers, logs) to <checkpoint URI>/<run id>/, bounded by
#      TRIPLET_SHUTDOWN_PUSH_TIMEOUT_S (10) seconds. Big files were sent by the periodic checkpoints.
#
# The same environment variables as startup_preprocess.sh apply (TRIPLET_MOUNT_WORK, TRIPLET_RUN_DIR, ...).
set -Eeuo pipefail
SELF_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$SELF_DIR/lib.sh" ]]; then
  # Run alone from metadata (shutdown-script-url): use the checkout's copy, or stage 0's.
  for copy in "${TRIPLET_REPO_DIR:-/mnt/work/repo}/gcp/scripts" "${TRIPLET_BOOTSTRAP_DIR:-/var/lib/triplet/bootstrap}" \
    "${TRIPLET_BOOTSTRAP_DIR:-/var/lib/triplet/bootstrap}/gcp/scripts"; do
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

: "${TRIPLET_MOUNT_WORK:=/mnt/work}"
: "${TRIPLET_REPO_DIR:=${TRIPLET_MOUNT_WORK}/repo}"
: "${TRIPLET_STATE_DIR:=${TRIPLET_MOUNT_WORK}/state}"
: "${TRIPLET_LOG_DIR:=${TRIPLET_MOUNT_WORK}/logs}"
: "${TRIPLET_CONFIG_DIR:=${TRIPLET_MOUNT_WORK}/config}"
: "${TRIPLET_RUN_DIR:=/run/triplet}"
: "${TRIPLET_METADATA:=required}"
: "${TRIPLET_UNIT:=triplet-preprocess}"
: "${TRIPLET_SYSTEMCTL:=systemctl}"
: "${TRIPLET_PYTHON:=${TRIPLET_REPO_DIR}/.venv/bin/python}"
: "${TRIPLET_SHUTDOWN_GRACE_S:=15}"
: "${TRIPLET_SHUTDOWN_PUSH_TIMEOUT_S:=10}"
: "${TRIPLET_ASSUME_SHUTDOWN:=0}"

# ------------------------------------------------------------------------------ is a shutdown under way?
preempted=UNKNOWN
if [[ "$TRIPLET_METADATA" != off ]]; then
  tmp="$(mktemp)"
  if TRIPLET_METADATA_TRIES=2 TRIPLET_METADATA_TIMEOUT_S=2 meta_fetch instance/preempted "$tmp"; then
    preempted="$(read_value "$tmp" || echo UNKNOWN)"
  fi
  rm -f "$tmp"
fi
system_state="$("$TRIPLET_SYSTEMCTL" is-system-running 2>/dev/null || true)"
reason=""
if [[ "$preempted" == TRUE ]]; then
  reason=preempted
elif [[ "$system_state" == stopping ]]; then
  reason=shutdown
elif [[ "$TRIPLET_ASSUME_SHUTDOWN" == 1 ]]; then
  reason=shutdown
fi
if [[ -z "$reason" ]]; then
  # A live VM (guest agent reinstall/upgrade runs shutdown scripts): touch nothing, not even a log file.
  log "no shutdown under way (preempted=${preempted}, system ${system_state:-unknown}): nothing to do"
  exit 0
fi

if [[ -d "$TRIPLET_LOG_DIR" ]]; then
  TRIPLET_LOG_FILE="$TRIPLET_LOG_DIR/$(date -u +%Y%m%dT%H%M%SZ)-$$-shutdown.log"
  TRIPLET_EVENTS_FILE="${TRIPLET_LOG_FILE%.log}.jsonl"
fi
log "shutdown under way (${reason}; preempted=${preempted}, system ${system_state:-unknown})"

# ------------------------------------------------------------------------------------------- stop the job
# A pid file names a process only while /proc says it still runs our command (pids get reused).
pid_of() {
  local file="$TRIPLET_RUN_DIR/$1" pid
  [[ -f "$file" ]] || return 1
  pid="$(<"$file")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE -- "$2" || return 1
  printf '%s' "$pid"
}

pids=()
if [[ -d /run/systemd/system ]] && "$TRIPLET_SYSTEMCTL" is-active --quiet "$TRIPLET_UNIT.service" 2>/dev/null; then
  log "SIGTERM to $TRIPLET_UNIT.service"
  "$TRIPLET_SYSTEMCTL" kill --signal=SIGTERM --kill-whom=main "$TRIPLET_UNIT.service" 2>/dev/null || true
fi
# The wrappers (the job, or a startup run in direct mode) forward SIGTERM to the engine and record the
# interruption; the engine is signalled directly only when no wrapper is left (one SIGTERM each: a second
# one makes the engine exit at once instead of finishing its save).
for name in job startup; do
  if p="$(pid_of "$name.pid" startup_preprocess)"; then
    log "SIGTERM to the $name wrapper (pid $p)"
    kill -TERM "$p" 2>/dev/null || true
    pids+=("$p")
  fi
done
if p="$(pid_of engine.pid '-m building_image_triplet_model')"; then
  if ((${#pids[@]} == 0)); then
    log "SIGTERM to the engine (pid $p)"
    kill -TERM "$p" 2>/dev/null || true
  fi
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
if [[ -d "$TRIPLET_STATE_DIR" || -d "$TRIPLET_MOUNT_WORK" ]]; then
  mkdir -p "$TRIPLET_STATE_DIR"
  phase=""
  for p in download extract preprocess finalize; do
    if [[ "$(marker_get "$TRIPLET_STATE_DIR/$p.json" status "" 2>/dev/null)" =~ ^(running|interrupted)$ ]]; then
      phase="$p"
    fi
  done
  if [[ "$reason" == preempted ]]; then
    marker_update "$TRIPLET_STATE_DIR/preemptions.json" count+=1 last_at="$(utc_now)" \
      events@="{\"at\": \"$(utc_now)\", \"phase\": \"${phase:-none}\"}" --keep 100
    n="$(marker_get "$TRIPLET_STATE_DIR/preemptions.json" count 0)"
    log "preemption counted ($n so far; phase ${phase:-none})"
    TRIPLET_EVENT_SEVERITY=WARNING event preemption "preempted during phase ${phase:-none}" phase="${phase:-none}" \
      preemptions:="$n"
  else
    marker_update "$TRIPLET_STATE_DIR/preemptions.json" stops+=1 last_stop_at="$(utc_now)"
  fi
fi

ckpt="" run_id=""
[[ -f "$TRIPLET_CONFIG_DIR/checkpoint-uri" ]] && ckpt="$(read_value "$TRIPLET_CONFIG_DIR/checkpoint-uri" || true)"
[[ -f "$TRIPLET_CONFIG_DIR/run-id" ]] && run_id="$(read_value "$TRIPLET_CONFIG_DIR/run-id" || true)"
if [[ -z "$ckpt" || -z "$run_id" || ! -x "$TRIPLET_PYTHON" ]]; then
  log "no checkpoint location configured: nothing to push"
  exit 0
fi
dest="$ckpt/$run_id"
push() {
  timeout --kill-after=2 "$TRIPLET_SHUTDOWN_PUSH_TIMEOUT_S" env PYTHONPATH="$TRIPLET_REPO_DIR" "$TRIPLET_PYTHON" \
    -m building_image_triplet_model.cloud_sync push "$@" --max-size 16777216
}
rc=0
[[ -d "$TRIPLET_LOG_DIR" ]] && { push "$TRIPLET_LOG_DIR" "$dest/logs" || rc=$?; }
((rc == 0)) && { push "$TRIPLET_STATE_DIR" "$dest/state" --marker '*' || rc=$?; }
if ((rc == 0)); then
  log "pushed state and logs to $dest"
else
  warn "push to $dest failed or timed out (exit $rc)"
fi
exit 0
