#!/usr/bin/env bash
# VM bootstrap for the 3D Street View preprocessing: runs at EVERY boot (the guest agent's
# google-startup-scripts.service runs the `startup-script-url` object), idempotent, one run at a time.
#
#   startup_preprocess.sh [STEP...]        (default: all, the steps below in this order: ALL_STEPS)
#
#   system      repair an interrupted dpkg; aria2, git, curl, python3-venv; uv (pinned, with pip); Debian's
#               NVIDIA driver (skipped when nvidia-smi works or there is no NVIDIA device)     gcp/scripts/system.sh
#   disks       mount the raw and the work disk by device name; format only a disk with nothing on it
#                                                                                              gcp/scripts/disks.sh
#   repo        clone, or fetch and fast-forward, triplet-repo-url at triplet-repo-ref into the work disk;
#               the remaining steps run from that checkout's copy of this script
#   uv          uv sync --frozen (the environment and uv's cache on the work disk: a recreated VM reuses both)
#   config      settings (instance metadata / environment), manifest and preprocess YAML, checked and stored
#   preflight   the locked torch must see the GPU and run a bf16 matmul (a failure names both CUDA versions)
#   ops-agent   Google's Ops Agent when triplet-install-ops-agent is true
#   restore     a new work disk and a checkpoint in the bucket: restore it first
#   start       the job as its own systemd unit (systemd-run), or in the foreground (direct mode)
# Other steps: job (what the unit runs), checkpoint (push to the bucket now), status, paths. With the
# setting triplet-bake=true (the builder VM of `gcp/provision.sh image`) a boot runs `system`, then
# cleans apt's cache and powers off: the disk then becomes the image that VMs boot from.
# The job, its phases, checkpoints and settings are Python: building_image_triplet_model/vm/.
# Docs: docs/bootstrap.md. Environment: TRIPLET_RUN_MODE=auto|systemd|direct, TRIPLET_SKIP_SYSTEM=1,
# TRIPLET_SKIP_DISKS=1, TRIPLET_SKIP_REPO=1, TRIPLET_SKIP_UV_SYNC=1, TRIPLET_METADATA=required|optional|off,
# and the folders of building_image_triplet_model/vm/paths.py.
# shellcheck disable=SC2153 # the TRIPLET_* folders come from load_paths (building_image_triplet_model/vm/paths.py)
set -Eeuo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
SELF_DIR="$(dirname "$SELF")"

# ------------------------------------------------------------------------------------------- stage 0
# Fetched by the guest agent the script is alone in a temporary folder: clone the repository onto the boot
# disk (/var/lib/triplet/bootstrap) and run its copy. The only self-contained part: nothing else of the
# project is on the machine yet, so it reads its two settings and installs git itself.
stage0() {
  local dir="${TRIPLET_BOOTSTRAP_DIR:-/var/lib/triplet/bootstrap}" url ref n
  local md="http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1/instance/attributes"
  s0get() {
    [[ "${TRIPLET_METADATA:-required}" != off ]] || return 0
    curl -sSf --retry 10 --retry-connrefused --retry-delay 2 --max-time 10 \
      -H 'Metadata-Flavor: Google' "$md/$1" 2>/dev/null || true
  }
  url="${TRIPLET_REPO_URL:-$(s0get triplet-repo-url)}"
  ref="${TRIPLET_REPO_REF:-$(s0get triplet-repo-ref)}"
  ref="${ref:-gcp}"
  # Checked again, strictly, once the project's settings module is there (building_image_triplet_model/vm).
  if [[ -z "$url" || "$url" == *[[:space:][:cntrl:]\;\|\&\$\`\'\"\<\>\(\)]* || "$url" == -* ]]; then
    echo "startup_preprocess: ERROR: no valid triplet-repo-url (an https://, ssh://, git@ or file:/// URL)" >&2
    exit 1
  fi
  if [[ "$ref" == *[[:space:][:cntrl:]]* || "$ref" == *..* || "$ref" == -* ]]; then
    echo "startup_preprocess: ERROR: triplet-repo-ref is invalid" >&2
    exit 1
  fi
  if ! command -v git >/dev/null 2>&1; then
    # A preemption during an earlier apt run leaves dpkg half-configured: repair first (as system.sh does).
    [[ -z "$(dpkg --audit 2>/dev/null)" ]] || DEBIAN_FRONTEND=noninteractive dpkg --configure -a || true
    for n in 1 2 3 4 5; do
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q git ca-certificates python3 && break
      sleep $((n * 5))
    done
  fi
  for n in 1 2 3 4 5; do
    if [[ -d "$dir/.git" ]]; then
      git -C "$dir" fetch --quiet origin -- "$ref" && git -C "$dir" checkout --quiet --force --detach FETCH_HEAD && break
    else
      mkdir -p "$(dirname "$dir")"
      rm -rf -- "$dir"
      git clone --quiet -- "$url" "$dir" && git -C "$dir" fetch --quiet origin -- "$ref" &&
        git -C "$dir" checkout --quiet --force --detach FETCH_HEAD && break
    fi
    echo "startup_preprocess: fetching the repository failed (attempt $n), retrying" >&2
    sleep $((n * 5))
  done
  [[ -f "$dir/gcp/scripts/startup_preprocess.sh" ]] ||
    { echo "startup_preprocess: ERROR: no gcp/scripts/startup_preprocess.sh in the repository ($ref)" >&2; exit 1; }
  exec env TRIPLET_REPO_URL="$url" TRIPLET_REPO_REF="$ref" bash "$dir/gcp/scripts/startup_preprocess.sh" "$@"
}
[[ -f "$SELF_DIR/lib.sh" ]] || stage0 "$@"

# shellcheck source=gcp/scripts/lib.sh
source "$SELF_DIR/lib.sh"
# shellcheck source=gcp/scripts/system.sh
source "$SELF_DIR/system.sh"
# shellcheck source=gcp/scripts/disks.sh
source "$SELF_DIR/disks.sh"
TRIPLET_LOG_TAG=startup_preprocess
load_paths
: "${TRIPLET_RUN_MODE:=auto}"
: "${TRIPLET_UNIT:=triplet-preprocess}"
: "${TRIPLET_SYSTEMD_RUN:=systemd-run}"
: "${TRIPLET_PYTHON:=${TRIPLET_REPO_DIR}/.venv/bin/python}"
export TRIPLET_PYTHON TRIPLET_REPO_DIR
ALL_STEPS=(system disks repo uv config preflight ops-agent restore start)
OPTIONAL_STEPS=(ops-agent) # of ALL_STEPS: a failure is a warning, and the boot goes on to the job
OTHER_STEPS=(job checkpoint status paths bake)
TRIPLET_CHILD_PID=""

run_mode() {
  if is_true "${TRIPLET_FOREGROUND:-0}"; then printf direct; return 0; fi
  case "$TRIPLET_RUN_MODE" in
    systemd | direct) printf '%s' "$TRIPLET_RUN_MODE" ;;
    auto) if [[ -d /run/systemd/system ]]; then printf systemd; else printf direct; fi ;;
    *) die "TRIPLET_RUN_MODE must be auto, systemd or direct" ;;
  esac
}

start_log_file() {
  mkdir -p "$TRIPLET_LOG_DIR"
  if [[ -z "${TRIPLET_LOG_FILE}" || ! -w "$(dirname "${TRIPLET_LOG_FILE}")" ]]; then
    TRIPLET_LOG_FILE="$TRIPLET_LOG_DIR/$(date -u +%Y%m%dT%H%M%SZ)-$$-${1}.log"
    TRIPLET_EVENTS_FILE="${TRIPLET_LOG_FILE%.log}.jsonl"
    export TRIPLET_LOG_FILE TRIPLET_EVENTS_FILE
  fi
}

# Python steps run as children, so that a SIGTERM to this script reaches them (on_term forwards it). The
# command is started as a simple command, not as the shell function `vm`: its pid is then Python's own.
run_vm() {
  local rc=0 VM_CMD
  vm_cmd vm "$@"
  "${VM_CMD[@]}" &
  TRIPLET_CHILD_PID=$!
  wait "$TRIPLET_CHILD_PID" || rc=$?
  TRIPLET_CHILD_PID=""
  return "$rc"
}

step_repo() {
  if is_true "${TRIPLET_SKIP_REPO:-0}"; then
    log "repo: skipped (TRIPLET_SKIP_REPO=1); using $TRIPLET_REPO_DIR"
    return 0
  fi
  local url ref
  url="$(sysvm vm.settings get repo-url)" || die "repo: the setting repo-url is invalid"
  ref="$(sysvm vm.settings get repo-ref)" || die "repo: the setting repo-ref is invalid"
  if [[ -d "$TRIPLET_REPO_DIR/.git" ]]; then
    retry 5 git -C "$TRIPLET_REPO_DIR" fetch --quiet origin -- "$ref"
    if git -C "$TRIPLET_REPO_DIR" symbolic-ref -q HEAD >/dev/null; then
      git -C "$TRIPLET_REPO_DIR" merge --quiet --ff-only FETCH_HEAD ||
        die "repo: $TRIPLET_REPO_DIR cannot fast-forward to $ref (local commits or changes?)"
    elif git -C "$TRIPLET_REPO_DIR" merge-base --is-ancestor HEAD FETCH_HEAD; then
      git -C "$TRIPLET_REPO_DIR" checkout --quiet --detach FETCH_HEAD
    else
      die "repo: $ref is not a fast-forward of the checked-out commit"
    fi
  else
    [[ -n "$url" ]] || die "repo: $TRIPLET_REPO_DIR is not a checkout and no repo-url is set"
    log "repo: cloning $url ($ref) into $TRIPLET_REPO_DIR"
    rm -rf -- "$TRIPLET_REPO_DIR.partial"
    retry 5 git clone --quiet --no-checkout -- "$url" "$TRIPLET_REPO_DIR.partial"
    retry 5 git -C "$TRIPLET_REPO_DIR.partial" fetch --quiet origin -- "$ref"
    if git -C "$TRIPLET_REPO_DIR.partial" show-ref --verify --quiet "refs/remotes/origin/$ref"; then
      git -C "$TRIPLET_REPO_DIR.partial" checkout --quiet -B "$ref" --track "origin/$ref"
    else
      git -C "$TRIPLET_REPO_DIR.partial" checkout --quiet --detach FETCH_HEAD
    fi
    mv -T -- "$TRIPLET_REPO_DIR.partial" "$TRIPLET_REPO_DIR"
  fi
  log "repo: $TRIPLET_REPO_DIR at $(git -C "$TRIPLET_REPO_DIR" rev-parse --short HEAD) ($ref)"
}

step_uv() {
  if is_true "${TRIPLET_SKIP_UV_SYNC:-0}"; then
    log "uv: skipped (TRIPLET_SKIP_UV_SYNC=1)"
  else
    mkdir -p "$TRIPLET_CACHE_DIR/uv"
    log "uv: uv sync --frozen in $TRIPLET_REPO_DIR (cache $TRIPLET_CACHE_DIR/uv)"
    (cd "$TRIPLET_REPO_DIR" && UV_CACHE_DIR="$TRIPLET_CACHE_DIR/uv" UV_PYTHON_DOWNLOADS=never \
      retry 3 run_logged "$TRIPLET_UV" sync --frozen --no-progress --compile-bytecode)
  fi
  [[ -x "$TRIPLET_PYTHON" ]] || die "uv: no Python at $TRIPLET_PYTHON"
}

# Google's Ops Agent from its apt repository (no installer piped to a shell), configured with
# gcp/ops-agent/config.yaml (ships the .jsonl progress logs to Cloud Logging).
step_ops_agent() {
  local conf="$TRIPLET_REPO_DIR/gcp/ops-agent/config.yaml" codename key tmp
  if [[ "$(vm vm get install-ops-agent)" != true ]]; then
    log "ops-agent: not requested (triplet-install-ops-agent)"
    return 0
  fi
  if is_true "${TRIPLET_SKIP_SYSTEM:-0}"; then
    log "ops-agent: skipped (TRIPLET_SKIP_SYSTEM=1)"
    return 0
  fi
  if ! dpkg -s google-cloud-ops-agent >/dev/null 2>&1; then
    codename="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)"
    matches "$codename" '^[a-z]+$' || die "ops-agent: unknown Debian codename"
    tmp=/usr/share/keyrings/triplet-cloud-google.tmp
    key=/usr/share/keyrings/triplet-cloud-google.gpg
    retry 5 curl -fsSL --max-time 60 -o "$tmp" https://packages.cloud.google.com/apt/doc/apt-key.gpg
    if [[ "$(head -c 5 "$tmp")" == "-----" ]]; then key=/usr/share/keyrings/triplet-cloud-google.asc; fi
    mv -f "$tmp" "$key"
    printf 'deb [signed-by=%s] https://packages.cloud.google.com/apt google-cloud-ops-agent-%s-all main\n' \
      "$key" "$codename" >/etc/apt/sources.list.d/google-cloud-ops-agent.list
    apt_install google-cloud-ops-agent
  fi
  if [[ -f "$conf" ]] && ! cmp -s "$conf" /etc/google-cloud-ops-agent/config.yaml; then
    install -D -m 0644 "$conf" /etc/google-cloud-ops-agent/config.yaml
    "$TRIPLET_SYSTEMCTL" restart google-cloud-ops-agent || warn "ops-agent: restart failed"
    log "ops-agent: configured from $conf"
  fi
}

# The job as its own transient unit: the startup unit finishes in minutes instead of staying "activating"
# for a day, and at shutdown systemd sends the job SIGTERM. Direct mode: in the foreground.
step_start() {
  if [[ "$(run_mode)" == direct ]]; then
    log "start: direct mode: running the job in the foreground"
    run_vm job
    return
  fi
  if "$TRIPLET_SYSTEMCTL" is-active --quiet "$TRIPLET_UNIT.service"; then
    log "start: $TRIPLET_UNIT.service is already running"
    return 0
  fi
  "$TRIPLET_SYSTEMCTL" reset-failed "$TRIPLET_UNIT.service" >/dev/null 2>&1 || true
  local -a setenv=()
  local v
  while IFS= read -r v; do
    setenv+=("--setenv=$v=${!v}")
  done < <(compgen -e | grep -E '^(TRIPLET_|GCE_METADATA|STORAGE_EMULATOR_HOST$|GOOGLE_CLOUD_PROJECT$|(BATCH_)?TASK_(INDEX|COUNT)$)' |
    grep -vE '^TRIPLET_(LOCK_FD|LOCK_HELD|CHILD_PID|LOG_FILE|EVENTS_FILE|REEXECED)$')
  log "start: starting $TRIPLET_UNIT.service (systemd-run); follow it with journalctl -fu $TRIPLET_UNIT"
  "$TRIPLET_SYSTEMD_RUN" --unit="$TRIPLET_UNIT" --collect --quiet \
    --description="3D Street View preprocessing (gcp/scripts/startup_preprocess.sh job)" \
    --property=After=network-online.target --property=Wants=network-online.target \
    --property=KillMode=mixed --property=KillSignal=SIGTERM --property=TimeoutStopSec=25 \
    --property="RequiresMountsFor=$TRIPLET_MOUNT_RAW $TRIPLET_MOUNT_WORK" \
    "${setenv[@]}" --setenv=TRIPLET_LOG_FILE= --setenv=TRIPLET_EVENTS_FILE= --setenv=HOME="${HOME:-/root}" \
    /bin/bash "$SELF" job
}

# run_optional STEP FUNCTION: an optional step (OPTIONAL_STEPS) runs in a subshell with errexit on, so that
# its failure, even a die, is a warning: the job must not wait for the next boot because, say, the Ops
# Agent's repository was unreachable. The subshell is started in the background and traps SIGTERM itself,
# so that a stop reaches whatever it runs.
run_optional() {
  local step="$1" rc=0
  (
    trap on_term TERM INT
    "${@:2}"
  ) &
  TRIPLET_CHILD_PID=$!
  wait "$TRIPLET_CHILD_PID" || rc=$?
  TRIPLET_CHILD_PID=""
  ((rc == 0)) || warn "$step: failed (exit $rc); it is optional: going on without it"
}

on_term() {
  trap '' TERM INT
  log "SIGTERM: stopping (the job saves its progress and marks its phase interrupted)"
  if [[ -n "$TRIPLET_CHILD_PID" ]]; then
    kill -TERM "$TRIPLET_CHILD_PID" 2>/dev/null || true
    wait "$TRIPLET_CHILD_PID" 2>/dev/null || true
  fi
  exit 143
}

main() {
  local -a steps=("$@")
  ((${#steps[@]})) || steps=(all)
  if [[ "${steps[0]}" == -h || "${steps[0]}" == --help ]]; then
    sed -n '2,/^set -Eeuo/p' "$SELF" | sed '/^# shellcheck/d; $d; s/^# \{0,1\}//'
    return 0
  fi
  if [[ "${steps[*]}" == all ]]; then
    steps=("${ALL_STEPS[@]}")
    [[ "$(sysvm vm.settings get bake)" != true ]] || steps=(system bake)
  fi
  local s i
  for s in "${steps[@]}"; do
    [[ " ${ALL_STEPS[*]} ${OTHER_STEPS[*]} " == *" $s "* ]] ||
      { echo "startup_preprocess.sh: unknown step '$s' (see --help)" >&2; return 2; }
  done
  if [[ "${steps[*]}" == paths ]]; then printf 'SELF=%s\n' "$SELF"; sysvm vm.paths; return 0; fi
  mkdir -p "$TRIPLET_RUN_DIR"
  trap on_term TERM INT
  if [[ "${steps[*]}" != job && "${steps[*]}" != status ]]; then
    if [[ "${TRIPLET_LOCK_HELD:-0}" != 1 ]]; then
      exec {TRIPLET_LOCK_FD}>>"$TRIPLET_RUN_DIR/startup.lock"
      flock -n "$TRIPLET_LOCK_FD" || { log "another startup_preprocess.sh holds $TRIPLET_RUN_DIR/startup.lock; exiting"; return 0; }
      export TRIPLET_LOCK_HELD=1 TRIPLET_LOCK_FD
    fi
    printf '%s\n' "$$" >"$TRIPLET_RUN_DIR/startup.pid"
  fi
  # The work disk may not be mounted before the disks step: log to the journal only until then.
  # A bake writes no log file: it would end up in the image.
  if [[ "${steps[*]}" != status && " ${steps[*]} " != *" bake "* ]] &&
    { [[ " ${steps[*]} " != *" disks "* ]] || is_true "${TRIPLET_SKIP_DISKS:-0}"; }; then
    mkdir -p "$TRIPLET_MOUNT_WORK"
    if [[ "${steps[*]}" == job ]]; then start_log_file job; else start_log_file startup; fi
  fi
  log "steps: ${steps[*]} (mode $(run_mode), metadata ${TRIPLET_METADATA:-required})"
  for i in "${!steps[@]}"; do
    s="${steps[$i]}"
    if [[ " ${OPTIONAL_STEPS[*]} " == *" $s "* ]]; then
      run_optional "$s" "step_${s//-/_}"
      continue
    fi
    case "$s" in
      system) step_system ;;
      disks) step_disks; start_log_file startup ;;
      repo)
        step_repo
        # Continue with the checkout's own copy of this script (it may be newer than the running one).
        local mine="$TRIPLET_REPO_DIR/gcp/scripts/startup_preprocess.sh"
        if [[ "${TRIPLET_REEXECED:-0}" != 1 && -f "$mine" && "$(readlink -f "$mine")" != "$SELF" ]] && ((i + 1 < ${#steps[@]})); then
          log "repo: continuing with $mine"
          rm -f "$TRIPLET_RUN_DIR/startup.pid"
          TRIPLET_REEXECED=1 exec bash "$mine" "${steps[@]:$((i + 1))}"
        fi
        ;;
      uv) step_uv ;;
      config) run_vm config || die "config: the settings or the preprocess YAML are invalid (see above)" ;;
      preflight) run_vm preflight || TRIPLET_DIE_CODE=$? die "preflight: the GPU cannot be used (state/preflight.json)" ;;
      restore) run_vm restore || die "restore: the checkpoint could not be restored" ;;
      start) step_start ;;
      bake) step_bake ;;
      job)
        # The job's unit runs the step `job` alone: Python then replaces this shell and becomes the unit's
        # main process, so that the SIGTERM of a stop (KillMode=mixed sends it to the main process alone)
        # reaches the job, which stops its children, saves and records the interruption.
        if [[ "${steps[*]}" == job ]]; then
          local VM_CMD
          vm_cmd vm job
          exec "${VM_CMD[@]}"
        fi
        run_vm job
        ;;
      checkpoint) run_vm checkpoint ;;
      status) run_vm status ;;
    esac
  done
  if [[ -f "$TRIPLET_RUN_DIR/startup.pid" && "$(<"$TRIPLET_RUN_DIR/startup.pid")" == "$$" ]]; then
    rm -f "$TRIPLET_RUN_DIR/startup.pid"
  fi
}

main "$@"
