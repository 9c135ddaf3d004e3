#!/usr/bin/env bash
# VM bootstrap for the 3D Street View preprocessing: runs at EVERY boot (the guest agent's
# google-startup-scripts.service runs the `startup-script` metadata key), idempotent, one run at a time.
#
#   startup_preprocess.sh [STEP...]        (default: all)
#
# all = system disks repo uv config ops-agent restore start
#   system      NVIDIA driver (Debian 12: non-free `nvidia-driver` + linux-headers, skipped when nvidia-smi
#               works or no NVIDIA device), aria2, git, python3-venv, uv pinned via pip (no curl | sh)
#   disks       mount google-raw-data-1tb on /mnt/raw and google-work-scratch-512gb on /mnt/work; format
#               (ext4) only a disk on which blkid finds no filesystem; fstab by UUID with nofail, once
#   repo        clone, or fetch and fast-forward, triplet-repo-url at triplet-repo-ref (default branch gcp)
#               into /mnt/work/repo; the remaining steps then run from that checkout's copy of this script
#   uv          uv sync --frozen in the checkout
#   config      instance metadata attributes triplet-* -> validated files under /mnt/work/config
#   ops-agent   Google's Ops Agent when triplet-install-ops-agent=TRUE
#   restore     the work disk has no state but the bucket has: pull state, logs and the engine's work folder
#   start       the job as its own systemd unit (systemd-run), or in the foreground (direct mode)
# job = download -> extract -> preprocess (+ a checkpoint every triplet-checkpoint-interval-min) -> finalize
#       (artifact upload, verified) -> on-done; each phase is skipped when state/<phase>.json says done.
# Single steps: download, extract, preprocess, job, checkpoint, status, paths. Docs: docs/bootstrap.md.
#
# Every tunable is an environment variable with the VM default (docs/bootstrap.md lists them all), e.g.
# TRIPLET_MOUNT_RAW=/mnt/raw TRIPLET_MOUNT_WORK=/mnt/work GCE_METADATA_HOST=metadata.google.internal
# TRIPLET_SKIP_SYSTEM=0 TRIPLET_SKIP_DISKS=0 TRIPLET_SKIP_REPO=0 TRIPLET_RUN_MODE=auto TRIPLET_METADATA=required
# A setting `key` (metadata attribute triplet-key) is overridden by the environment variable TRIPLET_KEY.
set -Eeuo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
SELF_DIR="$(dirname "$SELF")"

# ------------------------------------------------------------------------------------------- stage 0
# Run straight from instance metadata, this file is alone in a temporary folder: fetch the repository
# (boot disk, /var/lib/triplet/bootstrap) and run its copy of this script. Self-contained on purpose.
stage0() {
  local dir="${TRIPLET_BOOTSTRAP_DIR:-/var/lib/triplet/bootstrap}" url ref scripts n
  local md="http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1/instance/attributes"
  s0log() { printf '%s startup_preprocess[%s]: stage0: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$$" "$*" >&2; }
  s0get() {
    [[ "${TRIPLET_METADATA:-required}" != off ]] || return 0
    curl -sSf --retry 10 --retry-connrefused --retry-delay 2 --max-time 10 \
      -H 'Metadata-Flavor: Google' "$md/$1" 2>/dev/null || true
  }
  # 1. The scripts folder in the bucket (triplet-scripts-uri), copied with the Cloud CLI of the image.
  scripts="${TRIPLET_SCRIPTS_URI:-$(s0get triplet-scripts-uri)}"
  if [[ -n "$scripts" ]]; then
    if [[ "$scripts" == *[[:cntrl:]]* || "$scripts" == *..* ||
      ! "$scripts" =~ ^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[A-Za-z0-9._~=+@,-]+)*/?$ ]]; then
      s0log "ERROR: metadata key triplet-scripts-uri is invalid (a gs://bucket/folder/ URI)"
      exit 1
    fi
    for n in 1 2 3 4 5; do
      rm -rf -- "$dir.partial"
      mkdir -p "$dir.partial"
      if "${TRIPLET_GCLOUD:-gcloud}" storage cp "${scripts%/}/*" "$dir.partial/" >&2 &&
        [[ -f "$dir.partial/startup_preprocess.sh" && -f "$dir.partial/lib.sh" ]]; then
        rm -rf -- "$dir"
        mv -T -- "$dir.partial" "$dir"
        s0log "running $dir/startup_preprocess.sh from $scripts"
        exec bash "$dir/startup_preprocess.sh" "$@"
      fi
      s0log "copying $scripts failed (attempt $n), retrying"
      sleep $((n * 5))
    done
    s0log "ERROR: cannot copy the bootstrap scripts from $scripts"
    exit 1
  fi
  # 2. Else the repository (triplet-repo-url at triplet-repo-ref), cloned onto the boot disk.
  url="${TRIPLET_REPO_URL:-$(s0get triplet-repo-url)}"
  ref="${TRIPLET_REPO_REF:-$(s0get triplet-repo-ref)}"
  ref="${ref:-gcp}"
  if [[ "$url" == *[[:cntrl:]]* ||
    ! "$url" =~ ^(https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+-]+)+/?|git@[A-Za-z0-9.-]+:[A-Za-z0-9._~/-]+|file:///[A-Za-z0-9._/-]+)$ ]]; then
    s0log "ERROR: neither triplet-scripts-uri nor a valid triplet-repo-url (https://, git@ or file:///) is set"
    exit 1
  fi
  if [[ "$ref" == *[[:cntrl:]]* || "$ref" == *..* || ! "$ref" =~ ^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$ ]]; then
    s0log "ERROR: metadata key triplet-repo-ref is invalid"
    exit 1
  fi
  if ! command -v git >/dev/null 2>&1; then
    for n in 1 2 3 4 5; do
      if apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q git ca-certificates; then
        break
      fi
      s0log "apt-get failed (attempt $n), retrying"
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
    s0log "fetching $url ($ref) failed (attempt $n), retrying"
    sleep $((n * 5))
  done
  [[ -f "$dir/gcp/scripts/startup_preprocess.sh" ]] || { s0log "ERROR: no gcp/scripts/startup_preprocess.sh in $url ($ref)"; exit 1; }
  s0log "running $dir/gcp/scripts/startup_preprocess.sh from $url ($ref)"
  exec env TRIPLET_REPO_URL="$url" TRIPLET_REPO_REF="$ref" bash "$dir/gcp/scripts/startup_preprocess.sh" "$@"
}
if [[ ! -f "$SELF_DIR/lib.sh" ]]; then
  stage0 "$@"
fi

# shellcheck source=gcp/scripts/lib.sh
source "$SELF_DIR/lib.sh"
TRIPLET_LOG_TAG=startup_preprocess

# ---------------------------------------------------------------------------------------- tunables
: "${TRIPLET_MOUNT_RAW:=/mnt/raw}"
: "${TRIPLET_MOUNT_WORK:=/mnt/work}"
: "${TRIPLET_RAW_DISK:=raw-data-1tb}"
: "${TRIPLET_WORK_DISK:=work-scratch-512gb}"
: "${TRIPLET_DISK_BY_ID_DIR:=/dev/disk/by-id}"
: "${TRIPLET_FSTAB:=/etc/fstab}"
: "${TRIPLET_REPO_DIR:=${TRIPLET_MOUNT_WORK}/repo}"
: "${TRIPLET_STATE_DIR:=${TRIPLET_MOUNT_WORK}/state}"
: "${TRIPLET_LOG_DIR:=${TRIPLET_MOUNT_WORK}/logs}"
: "${TRIPLET_CONFIG_DIR:=${TRIPLET_MOUNT_WORK}/config}"
: "${TRIPLET_OUTPUT_DIR:=${TRIPLET_MOUNT_WORK}/output}"
: "${TRIPLET_CACHE_DIR:=${TRIPLET_MOUNT_WORK}/cache}"
: "${TRIPLET_RAW_DIR:=${TRIPLET_MOUNT_RAW}}"
: "${TRIPLET_ARCHIVE_DIR:=${TRIPLET_RAW_DIR}/dataset_unaligned}"
: "${TRIPLET_EXTRACT_DIR:=${TRIPLET_MOUNT_RAW}/extracted}"
: "${TRIPLET_RUN_DIR:=/run/triplet}"
: "${TRIPLET_LOCK_FILE:=${TRIPLET_RUN_DIR}/startup.lock}"
: "${TRIPLET_JOB_LOCK_FILE:=${TRIPLET_RUN_DIR}/job.lock}"
: "${TRIPLET_SYSTEM_STATE_DIR:=/var/lib/triplet}"
: "${TRIPLET_METADATA:=required}"
: "${TRIPLET_SKIP_SYSTEM:=0}"
: "${TRIPLET_SKIP_DISKS:=0}"
: "${TRIPLET_SKIP_REPO:=0}"
: "${TRIPLET_SKIP_UV_SYNC:=0}"
: "${TRIPLET_RUN_MODE:=auto}"
: "${TRIPLET_UNIT:=triplet-preprocess}"
: "${TRIPLET_SYSTEMD_RUN:=systemd-run}"
: "${TRIPLET_SYSTEMCTL:=systemctl}"
: "${TRIPLET_UV_VERSION:=0.13.9}"
: "${TRIPLET_UV_VENV:=/opt/triplet-uv}"
: "${TRIPLET_UV:=uv}"
: "${TRIPLET_PYTHON:=${TRIPLET_REPO_DIR}/.venv/bin/python}"
: "${TRIPLET_GCLOUD:=gcloud}"
: "${TRIPLET_PROCESSOR_MODULE:=building_image_triplet_model.dataset_processor}"
: "${TRIPLET_STATUS_MODULE:=building_image_triplet_model.preprocess_resume}"
: "${TRIPLET_SHUTDOWN_GRACE_S:=15}"
: "${TRIPLET_ALLOW_REBOOT:=1}"
: "${TRIPLET_OVERRIDE_PATHS:=1}"
: "${TRIPLET_APT_SOURCES:=/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources}"
export TRIPLET_MOUNT_RAW TRIPLET_MOUNT_WORK TRIPLET_REPO_DIR TRIPLET_STATE_DIR TRIPLET_LOG_DIR TRIPLET_CONFIG_DIR \
  TRIPLET_OUTPUT_DIR TRIPLET_CACHE_DIR TRIPLET_RAW_DIR TRIPLET_ARCHIVE_DIR TRIPLET_EXTRACT_DIR TRIPLET_RUN_DIR \
  TRIPLET_METADATA TRIPLET_PYTHON GCE_METADATA_HOST

ALL_STEPS=(system disks repo uv config ops-agent restore start)
HOST="$(hostname 2>/dev/null || echo unknown)"
CURRENT_PHASE=""
CKPT_LOOP_PID=""
TRIPLET_CHILD_PID=""

# ------------------------------------------------------------------------------------ small helpers
# In children that may outlive this script (the engine, the checkpoint loop): no inherited lock.
close_lock_fds() {
  if [[ -n "${TRIPLET_LOCK_FD:-}" ]]; then exec {TRIPLET_LOCK_FD}>&-; fi
  if [[ -n "${JOB_LOCK_FD:-}" ]]; then exec {JOB_LOCK_FD}>&-; fi
  return 0
}
vpy() { PYTHONPATH="${TRIPLET_REPO_DIR}${PYTHONPATH:+:$PYTHONPATH}" "$TRIPLET_PYTHON" "$@"; }
vhelper() { vpy "$TRIPLET_HELPERS" "$@"; }
cloud_sync() { vpy -m building_image_triplet_model.cloud_sync "$@"; }
is_true() { [[ "${1,,}" =~ ^(1|true|yes|on)$ ]]; }

run_mode() {
  if is_true "${TRIPLET_FOREGROUND:-0}"; then
    printf direct
    return 0
  fi
  case "$TRIPLET_RUN_MODE" in
    systemd | direct) printf '%s' "$TRIPLET_RUN_MODE" ;;
    auto) if [[ -d /run/systemd/system ]]; then printf systemd; else printf direct; fi ;;
    *) die "TRIPLET_RUN_MODE must be auto, systemd or direct" ;;
  esac
}

metadata_on() { [[ "$TRIPLET_METADATA" != off ]]; }

# meta_value PATH: print an instance value (instance/name, project/project-id...) or nothing.
meta_value() {
  local tmp rc=0
  metadata_on || return 1
  mkdir -p "$TRIPLET_RUN_DIR"
  tmp="$(mktemp "$TRIPLET_RUN_DIR/meta.XXXXXX")"
  meta_fetch "$1" "$tmp" || rc=$?
  if ((rc == 0)); then read_value "$tmp" || rc=1; fi
  rm -f "$tmp"
  return "$rc"
}

start_log_file() {
  mkdir -p "$TRIPLET_LOG_DIR"
  if [[ -z "${TRIPLET_LOG_FILE}" || ! -w "$(dirname "${TRIPLET_LOG_FILE}")" ]]; then
    TRIPLET_LOG_FILE="$TRIPLET_LOG_DIR/$(date -u +%Y%m%dT%H%M%SZ)-$$-${1}.log"
    TRIPLET_EVENTS_FILE="${TRIPLET_LOG_FILE%.log}.jsonl"
    export TRIPLET_LOG_FILE TRIPLET_EVENTS_FILE
    log "logging to $TRIPLET_LOG_FILE"
  fi
}

# ----------------------------------------------------------------------------------------- settings
# Every setting KEY: metadata attribute triplet-KEY (instance/attributes/triplet-KEY), overridden by the
# environment variable TRIPLET_<KEY> (upper case, '-' as '_'). The raw text goes to a file; it is validated
# by a whole-value regex (or parsed as YAML) and never evaluated.
GS_RE='^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[A-Za-z0-9._~=+@,-]+)*/?$'
REL_RE='^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$'
LOCAL_RE='^/?[A-Za-z0-9._~=+@,-]+(/[A-Za-z0-9._~=+@,-]+)*/?$'
REPO_URL_RE='^(https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+-]+)+/?|git@[A-Za-z0-9.-]+:[A-Za-z0-9._~/-]+|ssh://[A-Za-z0-9.@-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+-]+)+|file:///[A-Za-z0-9._/-]+)$'
REF_RE='^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$'
RUN_ID_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'

env_name() {
  local k="${1^^}"
  printf 'TRIPLET_%s' "${k//-/_}"
}

# fetch_raw KEY FILE: 0 when the setting is given (env or metadata) and its raw text is in FILE.
fetch_raw() {
  local key="$1" file="$2" envvar rc=0
  envvar="$(env_name "$key")"
  mkdir -p "$(dirname "$file")"
  if [[ -n "${!envvar+set}" ]]; then
    printf '%s' "${!envvar}" >"$file"
    SETTING_SOURCE="env"
    return 0
  fi
  metadata_on || return 1
  meta_attr "triplet-$key" "$file" || rc=$?
  case "$rc" in
    0) SETTING_SOURCE="metadata"; return 0 ;;
    1) return 1 ;;
    *)
      if [[ "$TRIPLET_METADATA" == required ]]; then
        die "metadata server http://${GCE_METADATA_HOST} unreachable while reading 'triplet-$key'"
      fi
      warn "metadata server unreachable; '$key' takes its default"
      return 1
      ;;
  esac
}

# setting KEY DEFAULT CHECK: resolve, validate with the function CHECK (value, source), store in
# $TRIPLET_CONFIG_DIR/KEY and print it.
setting() {
  local key="$1" default="$2" check="$3" raw value
  raw="$TRIPLET_CONFIG_DIR/raw/$key"
  SETTING_SOURCE=default
  if fetch_raw "$key" "$raw"; then
    value="$(read_value "$raw")" || die "setting '$key' ($SETTING_SOURCE): contains NUL bytes"
  else
    value="$default"
  fi
  if [[ -n "$value" ]] && ! "$check" "$value" "$SETTING_SOURCE"; then
    die "setting '$key' from $SETTING_SOURCE ($(setting_origin "$key")) is invalid" \
      "($(printf '%q' "${value:0:80}")): $(check_hint "$check")"
  fi
  mkdir -p "$TRIPLET_CONFIG_DIR"
  printf '%s' "$value" >"$TRIPLET_CONFIG_DIR/$key.tmp"
  mv -f "$TRIPLET_CONFIG_DIR/$key.tmp" "$TRIPLET_CONFIG_DIR/$key"
  printf '%s' "$value"
}

setting_origin() {
  case "$SETTING_SOURCE" in
    env) env_name "$1" ;;
    metadata) printf 'triplet-%s' "$1" ;;
    *) printf 'default' ;;
  esac
}

# cfg KEY: a setting stored by the config step.
cfg() {
  [[ -f "$TRIPLET_CONFIG_DIR/$1" ]] || die "setting '$1' not resolved yet (run the config step)"
  read_value "$TRIPLET_CONFIG_DIR/$1"
}

no_dotdot() { [[ "/$1/" != */../* && "/$1/" != */./* ]]; }
check_run_id() { matches "$1" "$RUN_ID_RE"; }
check_uri() { # gs:// from metadata; the environment may also name a local folder (dry runs)
  no_dotdot "${1#gs://}" || return 1
  matches "$1" "$GS_RE" && return 0
  [[ "$2" == env || "$2" == default ]] && matches "$1" "$LOCAL_RE"
}
check_manifest() {
  no_dotdot "${1#gs://}" || return 1
  matches "$1" "$GS_RE" || matches "$1" "$REL_RE" || { [[ "$2" == env ]] && matches "$1" "$LOCAL_RE"; }
}
check_repo_url() {
  matches "$1" "$REPO_URL_RE" && return 0
  [[ "$2" == env ]] && matches "$1" '^/[A-Za-z0-9._/-]+$'
}
check_ref() { matches "$1" "$REF_RE" && [[ "$1" != *..* && "$1" != *//* && "$1" != */ && "$1" != *.lock ]]; }
check_rel_path() {
  no_dotdot "$1" || return 1
  matches "$1" "$REL_RE" || { [[ "$2" == env ]] && matches "$1" "$LOCAL_RE"; }
}
check_bool() { matches "$1" '^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])$'; }
check_minutes() { matches "$1" '^[0-9]{1,4}$' && ((10#$1 >= 1 && 10#$1 <= 1440)); }
check_seconds() { matches "$1" '^[0-9]{1,6}$' && ((10#$1 >= 0 && 10#$1 <= 864000)); }
check_on_done() { matches "$1" '^(none|stop|delete)$'; }
check_deploy_mode() { matches "$1" '^(vm|mig)$'; }
check_mode() { matches "$1" '^(single|worker|merge)$'; }
check_gpu() { matches "$1" '^(auto|skip)$'; }
check_hint() {
  case "$1" in
    check_run_id) echo "1-63 letters, digits, '.', '_' or '-'" ;;
    check_uri) echo "a gs://bucket/prefix URI" ;;
    check_manifest) echo "a gs:// URI or a path relative to the repository" ;;
    check_repo_url) echo "an https://, ssh://, git@host: or file:/// repository URL" ;;
    check_ref) echo "a branch, tag or commit name" ;;
    check_rel_path) echo "a path relative to the repository, without '..'" ;;
    check_bool) echo "true or false" ;;
    check_minutes) echo "minutes, 1 to 1440" ;;
    check_seconds) echo "seconds, 0 to 864000" ;;
    check_on_done) echo "none, stop or delete" ;;
    check_deploy_mode) echo "vm or mig" ;;
    check_mode) echo "single, worker or merge" ;;
    check_gpu) echo "auto or skip" ;;
    *) echo "see docs/bootstrap.md" ;;
  esac
}

# -------------------------------------------------------------------------------------- step: system
enable_nonfree() {
  local -a files=()
  local f
  # shellcheck disable=SC2086 # TRIPLET_APT_SOURCES is a list of globs
  for f in $TRIPLET_APT_SOURCES; do [[ -f "$f" ]] && files+=("$f"); done
  ((${#files[@]})) || return 0
  helper apt-components "${files[@]}" >/dev/null
}

nvidia_present() {
  local v
  for v in /sys/bus/pci/devices/*/vendor; do
    [[ -r "$v" && "$(<"$v")" == 0x10de ]] && return 0
  done
  return 1
}

install_nvidia() {
  local gpu=auto raw="$TRIPLET_RUN_DIR/config/gpu-driver"
  SETTING_SOURCE=default
  if fetch_raw gpu-driver "$raw"; then
    gpu="$(read_value "$raw")" || gpu=invalid
    check_gpu "$gpu" || die "setting 'gpu-driver' must be auto or skip"
  fi
  if [[ "$gpu" == skip ]]; then
    log "system: NVIDIA driver skipped (gpu-driver=skip)"
    return 0
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    log "system: nvidia-smi works; driver already installed"
    return 0
  fi
  if ! nvidia_present; then
    log "system: no NVIDIA device on the PCI bus; driver not installed"
    return 0
  fi
  log "system: installing the NVIDIA driver (Debian: non-free nvidia-driver, built by DKMS for $(uname -r))"
  enable_nonfree
  retry 5 run_logged apt-get update -q
  retry 3 run_logged env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    "linux-headers-$(uname -r)" nvidia-driver firmware-misc-nonfree nvidia-smi
  modprobe nvidia 2>/dev/null || true
  if nvidia-smi >/dev/null 2>&1; then
    log "system: NVIDIA driver loaded: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    return 0
  fi
  mkdir -p "$TRIPLET_SYSTEM_STATE_DIR"
  if is_true "$TRIPLET_ALLOW_REBOOT" && [[ ! -e "$TRIPLET_SYSTEM_STATE_DIR/driver-reboot-done" ]]; then
    date -u +%Y-%m-%dT%H:%M:%SZ >"$TRIPLET_SYSTEM_STATE_DIR/driver-reboot-done"
    log "system: the driver needs a reboot to load (nouveau or a new kernel); rebooting once"
    "$TRIPLET_SYSTEMCTL" reboot
    exit 0
  fi
  die "system: the NVIDIA driver is installed but nvidia-smi fails (secure boot on? see journalctl -k)"
}

install_uv() {
  if command -v "$TRIPLET_UV" >/dev/null 2>&1 && "$TRIPLET_UV" --version 2>/dev/null | grep -qF " $TRIPLET_UV_VERSION"; then
    return 0
  fi
  log "system: installing uv ${TRIPLET_UV_VERSION} with pip into ${TRIPLET_UV_VENV}"
  [[ -x "$TRIPLET_UV_VENV/bin/python" ]] || python3 -m venv "$TRIPLET_UV_VENV"
  retry 5 run_logged "$TRIPLET_UV_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "uv==${TRIPLET_UV_VERSION}"
  ln -sf "$TRIPLET_UV_VENV/bin/uv" /usr/local/bin/uv
  TRIPLET_UV=/usr/local/bin/uv
}

step_system() {
  if is_true "$TRIPLET_SKIP_SYSTEM"; then
    log "system: skipped (TRIPLET_SKIP_SYSTEM=1)"
    return 0
  fi
  local -a need=()
  command -v aria2c >/dev/null 2>&1 || need+=(aria2)
  command -v git >/dev/null 2>&1 || need+=(git)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
  if ((${#need[@]})); then
    log "system: installing ${need[*]}"
    retry 5 run_logged apt-get update -q
    retry 3 run_logged env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      ca-certificates "${need[@]}"
  fi
  install_uv
  install_nvidia
}

# --------------------------------------------------------------------------------------- step: disks
# mount_disk NAME MOUNTPOINT LABEL
mount_disk() {
  local name="$1" mnt="$2" label="$3" dev real fstype pttype uuid cur
  dev="$TRIPLET_DISK_BY_ID_DIR/google-$name"
  [[ -e "$dev" ]] || die "disks: $dev not found: is the disk '$name' attached to this VM (device name '$name')?"
  real="$(readlink -f "$dev")"
  [[ -b "$real" ]] || die "disks: $dev -> $real is not a block device"
  if mountpoint -q "$mnt" 2>/dev/null; then
    cur="$(findmnt -n -o SOURCE --target "$mnt" 2>/dev/null || true)"
    if [[ "$(readlink -f "$cur")" == "$real" ]]; then
      log "disks: $real already mounted on $mnt"
      return 0
    fi
    die "disks: $mnt is already a mount point of $cur, not of $real"
  fi
  # A filesystem or a partition table found by blkid means: never format. blkid reads the device itself
  # (-c /dev/null: no stale cache), and the low-level probe (-p) must agree that there is nothing.
  fstype="$(blkid -c /dev/null -o value -s TYPE "$real" 2>/dev/null || true)"
  [[ -n "$fstype" ]] || fstype="$(blkid -p -o value -s TYPE "$real" 2>/dev/null || true)"
  pttype="$(blkid -p -o value -s PTTYPE "$real" 2>/dev/null || true)"
  if [[ -z "$fstype" ]]; then
    if [[ -n "$pttype" ]]; then
      die "disks: $real ($name) has a $pttype partition table and no filesystem: refusing to format it"
    fi
    log "disks: $real ($name) has no filesystem: formatting ext4"
    mkfs.ext4 -q -F -m 0 -L "$label" -E lazy_itable_init=0,lazy_journal_init=0 "$real"
    fstype=ext4
  else
    log "disks: $real ($name) holds $fstype: not formatting"
  fi
  uuid="$(blkid -c /dev/null -o value -s UUID "$real" 2>/dev/null || blkid -p -o value -s UUID "$real")"
  [[ -n "$uuid" ]] || die "disks: no UUID for $real"
  mkdir -p "$mnt"
  touch "$TRIPLET_FSTAB"
  if grep -qE "^[[:space:]]*UUID=${uuid}[[:space:]]" "$TRIPLET_FSTAB"; then
    :
  elif grep -qE "^[[:space:]]*[^#[:space:]]+[[:space:]]+${mnt}[[:space:]]" "$TRIPLET_FSTAB"; then
    warn "disks: $TRIPLET_FSTAB already has an entry for $mnt (not UUID=$uuid); left as it is"
  else
    printf 'UUID=%s %s %s defaults,nofail,discard 0 2\n' "$uuid" "$mnt" "$fstype" >>"$TRIPLET_FSTAB"
    log "disks: added UUID=$uuid $mnt to $TRIPLET_FSTAB"
  fi
  mount -t "$fstype" -o defaults,discard "$real" "$mnt"
  log "disks: mounted $real on $mnt"
}

step_disks() {
  if is_true "$TRIPLET_SKIP_DISKS"; then
    log "disks: skipped (TRIPLET_SKIP_DISKS=1); using folders $TRIPLET_MOUNT_RAW and $TRIPLET_MOUNT_WORK"
    mkdir -p "$TRIPLET_MOUNT_RAW" "$TRIPLET_MOUNT_WORK"
    return 0
  fi
  mount_disk "$TRIPLET_RAW_DISK" "$TRIPLET_MOUNT_RAW" raw
  mount_disk "$TRIPLET_WORK_DISK" "$TRIPLET_MOUNT_WORK" work
}

# ---------------------------------------------------------------------------------------- step: repo
step_repo() {
  if is_true "$TRIPLET_SKIP_REPO"; then
    log "repo: skipped (TRIPLET_SKIP_REPO=1); using $TRIPLET_REPO_DIR"
    return 0
  fi
  local url ref
  url="$(setting repo-url "" check_repo_url)"
  ref="$(setting repo-ref gcp check_ref)"
  if [[ -d "$TRIPLET_REPO_DIR/.git" ]]; then
    log "repo: fetching $ref into $TRIPLET_REPO_DIR"
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

# ------------------------------------------------------------------------------------------ step: uv
step_uv() {
  if is_true "$TRIPLET_SKIP_UV_SYNC"; then
    log "uv: skipped (TRIPLET_SKIP_UV_SYNC=1)"
  else
    mkdir -p "$TRIPLET_CACHE_DIR/uv"
    log "uv: uv sync --frozen in $TRIPLET_REPO_DIR"
    (cd "$TRIPLET_REPO_DIR" && UV_CACHE_DIR="$TRIPLET_CACHE_DIR/uv" UV_PYTHON_DOWNLOADS=never \
      retry 3 run_logged "$TRIPLET_UV" sync --frozen --no-progress)
  fi
  [[ -x "$TRIPLET_PYTHON" ]] || die "uv: no Python at $TRIPLET_PYTHON"
}

# ----------------------------------------------------------------------------------- step: ops-agent
# triplet-install-ops-agent=TRUE: Google's Ops Agent from its apt repository (no installer script piped to a
# shell), configured with the repository's gcp/ops-agent/config.yaml (ships /mnt/work/logs/*.jsonl).
step_ops_agent() {
  local conf="$TRIPLET_REPO_DIR/gcp/ops-agent/config.yaml" codename key
  if [[ "$(cfg install-ops-agent)" != true ]]; then
    log "ops-agent: not requested (triplet-install-ops-agent)"
    return 0
  fi
  if is_true "$TRIPLET_SKIP_SYSTEM"; then
    log "ops-agent: skipped (TRIPLET_SKIP_SYSTEM=1)"
    return 0
  fi
  if ! dpkg -s google-cloud-ops-agent >/dev/null 2>&1; then
    codename="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)"
    matches "$codename" '^[a-z]+$' || die "ops-agent: unknown Debian codename"
    local tmp=/usr/share/keyrings/triplet-cloud-google.tmp
    key=/usr/share/keyrings/triplet-cloud-google.gpg
    retry 5 curl -fsSL --max-time 60 -o "$tmp" https://packages.cloud.google.com/apt/doc/apt-key.gpg
    # apt reads a binary key as .gpg and an ASCII-armored one as .asc
    if [[ "$(head -c 5 "$tmp")" == "-----" ]]; then key=/usr/share/keyrings/triplet-cloud-google.asc; fi
    mv -f "$tmp" "$key"
    printf 'deb [signed-by=%s] https://packages.cloud.google.com/apt google-cloud-ops-agent-%s-all main\n' \
      "$key" "$codename" >/etc/apt/sources.list.d/google-cloud-ops-agent.list
    retry 5 run_logged apt-get update -q
    retry 3 run_logged env DEBIAN_FRONTEND=noninteractive apt-get install -y -q google-cloud-ops-agent
  fi
  if [[ -f "$conf" ]] && ! cmp -s "$conf" /etc/google-cloud-ops-agent/config.yaml; then
    install -D -m 0644 "$conf" /etc/google-cloud-ops-agent/config.yaml
    "$TRIPLET_SYSTEMCTL" restart google-cloud-ops-agent || warn "ops-agent: restart failed"
    log "ops-agent: configured from $conf"
  fi
}

# -------------------------------------------------------------------------------------- step: config
step_config() {
  local run_id ckpt out_uri extract base yaml_raw eff input h5_name mode minutes interval src
  mkdir -p "$TRIPLET_CONFIG_DIR/raw"
  mode="$(setting mode single check_mode)"
  task_settings "$mode"
  local default_id=local
  if metadata_on; then default_id="$(meta_value instance/name || echo local)"; fi
  check_run_id "$default_id" x || default_id=local
  run_id="$(setting run-id "$default_id" check_run_id)"
  ckpt="$(setting checkpoint-uri "" check_uri)"
  ckpt="${ckpt%/}"
  printf '%s' "$ckpt" >"$TRIPLET_CONFIG_DIR/checkpoint-uri"
  [[ -n "$ckpt" || "$mode" == single ]] || die "config: mode $mode needs a checkpoint-uri (the run's shards live there)"
  out_uri="$(setting output-uri "${ckpt:+$ckpt/$run_id/artifact}" check_uri)"
  setting repo-url "" check_repo_url >/dev/null
  setting repo-ref gcp check_ref >/dev/null
  extract="$(setting extract-archives false check_bool)"
  extract="${extract,,}"
  printf '%s' "$extract" >"$TRIPLET_CONFIG_DIR/extract-archives"
  # Checkpoint interval: triplet-checkpoint-interval-min (minutes); TRIPLET_CHECKPOINT_INTERVAL_S (seconds,
  # for dry runs and tests) wins when set.
  minutes="$(setting checkpoint-interval-min 30 check_minutes)"
  if [[ -n "${TRIPLET_CHECKPOINT_INTERVAL_S:-}" ]]; then
    check_seconds "$TRIPLET_CHECKPOINT_INTERVAL_S" env || die "TRIPLET_CHECKPOINT_INTERVAL_S: $(check_hint check_seconds)"
    interval="$((10#$TRIPLET_CHECKPOINT_INTERVAL_S))"
  else
    interval="$((10#$minutes * 60))"
  fi
  printf '%s' "$interval" >"$TRIPLET_CONFIG_DIR/checkpoint-interval-s"
  setting on-done none check_on_done >/dev/null
  setting deploy-mode vm check_deploy_mode >/dev/null
  setting metadata-cache-sync-uri "" check_uri >/dev/null
  setting merge-wait-s 3600 check_seconds >/dev/null
  local ops
  ops="$(setting install-ops-agent false check_bool)"
  printf '%s' "${ops,,}" >"$TRIPLET_CONFIG_DIR/install-ops-agent"
  fetch_manifest "$(setting manifest-uri data/downloads/raw_archives.txt check_manifest)"
  base="$(setting preprocess-config-path configs/vm.yaml check_rel_path)"
  src="$(setting preprocess-config-uri "" check_uri)"

  # The preprocess YAML, first found: TRIPLET_PREPROCESS_CONFIG_FILE (a file), metadata triplet-preprocess-config
  # (YAML text), preprocess-config-uri (gs:// or, from the environment, a path), preprocess-config-path (in
  # the repository). Parsed with yaml.safe_load, never executed.
  yaml_raw="$TRIPLET_CONFIG_DIR/raw/preprocess-config.yaml"
  rm -f "$yaml_raw"
  if [[ -n "${TRIPLET_PREPROCESS_CONFIG_FILE:-}" ]]; then
    cp -- "$TRIPLET_PREPROCESS_CONFIG_FILE" "$yaml_raw"
    log "config: preprocess YAML from $TRIPLET_PREPROCESS_CONFIG_FILE"
  elif metadata_on && meta_attr triplet-preprocess-config "$yaml_raw"; then
    log "config: preprocess YAML from metadata key triplet-preprocess-config"
  elif [[ -n "$src" ]]; then
    retry 4 cloud_sync cp "$src" "$yaml_raw" 2> >(stamp_lines) || die "config: cannot fetch $src"
    log "config: preprocess YAML from $src"
  else
    [[ "$base" == /* ]] || base="$TRIPLET_REPO_DIR/$base"
    [[ -f "$base" ]] || die "config: preprocess config $base not found"
    cp -- "$base" "$yaml_raw"
    log "config: preprocess YAML from $base"
  fi
  vhelper config-check "$yaml_raw" || die "config: the preprocess YAML is invalid (see above)"

  eff="$TRIPLET_CONFIG_DIR/preprocess.yaml"
  if is_true "$TRIPLET_OVERRIDE_PATHS"; then
    if [[ "$extract" == true ]]; then input="$TRIPLET_EXTRACT_DIR"; else input="$TRIPLET_ARCHIVE_DIR"; fi
    h5_name="$(basename "$(vhelper config-get "$yaml_raw" data.hdf5_path --default dataset.h5)")"
    [[ "$h5_name" =~ ^[A-Za-z0-9._-]+\.(h5|hdf5)$ ]] || die "config: data.hdf5_path must end in a plain .h5 file name"
    local -a sets=(--set "data.input_dir=$input" --set "data.hdf5_path=$TRIPLET_OUTPUT_DIR/$h5_name")
    [[ "$mode" == single ]] || sets+=(--set "data.manifest=$TRIPLET_CONFIG_DIR/manifest.txt")
    vhelper config-effective "$yaml_raw" "$eff" "${sets[@]}"
  else
    cp -- "$yaml_raw" "$eff"
  fi
  # The engine's own check of every key (exit 2 names the key); its paths decide what checkpoints carry.
  engine_paths >"$TRIPLET_CONFIG_DIR/engine-paths.tmp" || die "config: the engine refuses $eff (see above)"
  mv -f "$TRIPLET_CONFIG_DIR/engine-paths.tmp" "$TRIPLET_CONFIG_DIR/engine-paths"
  log "config: mode=$mode run-id=$run_id checkpoint-uri=${ckpt:-<none>} output-uri=${out_uri:-<none>}" \
    "extract=$extract on-done=$(cfg on-done) checkpoint every ${interval}s config=$eff"
  [[ -n "$ckpt" ]] || warn "config: no checkpoint-uri: nothing survives the loss of the work disk"
}

# task_settings MODE: a worker's TASK_INDEX/TASK_COUNT (or Cloud Batch's BATCH_TASK_INDEX/BATCH_TASK_COUNT).
task_settings() {
  local i="${TASK_INDEX:-${BATCH_TASK_INDEX:-}}" n="${TASK_COUNT:-${BATCH_TASK_COUNT:-}}"
  rm -f "$TRIPLET_CONFIG_DIR/task-index" "$TRIPLET_CONFIG_DIR/task-count"
  [[ "$1" == worker ]] || return 0
  if ! matches "$i" '^[0-9]{1,5}$' || ! matches "$n" '^[0-9]{1,5}$' || ((10#$i >= 10#$n)); then
    die "config: mode worker needs TASK_INDEX < TASK_COUNT (or BATCH_TASK_INDEX/BATCH_TASK_COUNT)"
  fi
  printf '%s' "$((10#$i))" >"$TRIPLET_CONFIG_DIR/task-index"
  printf '%s' "$((10#$n))" >"$TRIPLET_CONFIG_DIR/task-count"
}

# fetch_manifest URI: a local copy in $TRIPLET_CONFIG_DIR/manifest.txt (a gs:// manifest is fetched when the
# copy is missing or came from another URI).
fetch_manifest() {
  local uri="$1" local_copy="$TRIPLET_CONFIG_DIR/manifest.txt" src_file="$TRIPLET_CONFIG_DIR/manifest.source"
  if [[ "$uri" == gs://* ]]; then
    if [[ -s "$local_copy" && -f "$src_file" && "$(read_value "$src_file")" == "$uri" ]]; then
      return 0
    fi
    log "config: fetching the manifest $uri"
    retry 4 cloud_sync cp "$uri" "$local_copy.tmp" 2> >(stamp_lines) || die "config: cannot fetch the manifest $uri"
    mv -f "$local_copy.tmp" "$local_copy"
  else
    [[ "$uri" == /* ]] || uri="$TRIPLET_REPO_DIR/$uri"
    [[ -f "$uri" ]] || die "config: manifest $uri not found"
    cp -- "$uri" "$local_copy.tmp"
    mv -f "$local_copy.tmp" "$local_copy"
  fi
  printf '%s' "$1" >"$src_file"
}

# engine_paths: output, work folder, log, rejects, stats of the effective config (one per line), as the
# engine's own config module resolves them.
engine_paths() {
  (cd "$TRIPLET_REPO_DIR" && vpy - "$TRIPLET_CONFIG_DIR/preprocess.yaml" <<'PY'
import sys
from building_image_triplet_model import config
try:
    c = config.load(sys.argv[1])
except config.ConfigError as e:
    print(f"configuration error: {e}", file=sys.stderr)
    sys.exit(2)
for p in (c.output, c.work, c.log_path, c.rejects_path, c.stats_path):
    print(p)
PY
  )
}

load_engine_paths() {
  local -a p
  if [[ -s "$TRIPLET_CONFIG_DIR/engine-paths" && "$TRIPLET_CONFIG_DIR/engine-paths" -nt "$TRIPLET_CONFIG_DIR/preprocess.yaml" ]]; then
    mapfile -t p <"$TRIPLET_CONFIG_DIR/engine-paths"
  else
    mapfile -t p < <(engine_paths)
  fi
  ((${#p[@]} == 5)) || die "cannot resolve the engine's paths from $TRIPLET_CONFIG_DIR/preprocess.yaml"
  H5="${p[0]}" WORK="${p[1]}" ELOG="${p[2]}" REJECTS="${p[3]}" STATS="${p[4]}"
}

# --------------------------------------------------------------------------------------- checkpoints
# ckpt_dest: where this machine's state and logs go: CKPT/RUN (single VM), CKPT/RUN/tasks/I-of-N (a
# scale-out worker; its shards are published by the engine under CKPT/RUN/shards), CKPT/RUN/merge.
ckpt_dest() {
  local ckpt
  ckpt="$(cfg checkpoint-uri)"
  [[ -n "$ckpt" ]] || return 1
  case "$(cfg mode)" in
    worker) printf '%s/%s/tasks/%s-of-%s' "$ckpt" "$(cfg run-id)" "$(cfg task-index)" "$(cfg task-count)" ;;
    merge) printf '%s/%s/merge' "$ckpt" "$(cfg run-id)" ;;
    *) printf '%s/%s' "$ckpt" "$(cfg run-id)" ;;
  esac
}

# checkpoint [full|small]: engine files (full only, single-VM mode), then logs, then state markers last. The
# state is not sent when the engine files failed: a marker in the bucket never runs ahead of its data.
# One Python process for the three pushes (cloud_sync's incremental push_dir).
checkpoint() {
  local mode="${1:-full}" dest rc=0
  dest="$(ckpt_dest)" || return 0
  local -a out=()
  if [[ "$mode" == full && "$(cfg mode)" == single ]]; then
    load_engine_paths
    out=("$(dirname "$H5")" "$(basename "$WORK")" "$(basename "$ELOG")" "$(basename "$REJECTS")" "$(basename "$STATS")")
  fi
  mkdir -p "$TRIPLET_LOG_DIR" "$TRIPLET_STATE_DIR"
  vpy - "$dest" "$TRIPLET_LOG_DIR" "$TRIPLET_STATE_DIR" "${out[@]}" 2> >(stamp_lines) <<'PY' || rc=$?
import os
import sys

from building_image_triplet_model import cloud_sync as cs

dest, logs, state, *out = sys.argv[1:]
rc = 0


def push(src, to, **kw):
    global rc
    try:
        print("cloud_sync: " + cs.push_dir(src, to, **kw).summary(f"push {to}"), file=sys.stderr)
    except (cs.CloudSyncError, OSError) as e:
        print(f"cloud_sync: push {to}: {e}", file=sys.stderr)
        rc = 1


if out and os.path.isdir(out[0]):
    push(out[0], dest + "/output", include=out[1:])
push(logs, dest + "/logs")
if rc == 0:
    push(state, dest + "/state", markers=("*",))
sys.exit(rc)
PY
  ((rc == 0)) || warn "checkpoint to $dest failed (exit $rc); the next one will catch up"
  return "$rc"
}

checkpoint_loop() {
  close_lock_fds
  trap - EXIT
  trap 'exit 0' TERM INT
  local interval
  interval="$(cfg checkpoint-interval-s)"
  while :; do
    sleep "$interval" &
    wait $! || true
    log "checkpoint (every ${interval}s)"
    checkpoint full || true
  done
}

has_local_state() { compgen -G "$TRIPLET_STATE_DIR/*.json" >/dev/null; }

step_restore() {
  local dest
  dest="$(ckpt_dest)" || { log "restore: no checkpoint-uri"; return 0; }
  if has_local_state; then
    log "restore: the work disk has state ($TRIPLET_STATE_DIR); nothing to restore"
    return 0
  fi
  load_engine_paths
  if [[ "$(cfg mode)" == single && -e "$WORK" ]]; then
    warn "restore: $WORK exists but $TRIPLET_STATE_DIR has no markers; keeping the local files, not restoring"
    return 0
  fi
  if ! cloud_sync exists "$dest/state"; then
    log "restore: nothing under $dest/state: a fresh run"
    return 0
  fi
  log "restore: the work disk is new and $dest has a checkpoint: restoring it"
  mkdir -p "$(dirname "$H5")" "$TRIPLET_LOG_DIR" "$TRIPLET_STATE_DIR"
  if [[ "$(cfg mode)" == single ]] && cloud_sync exists "$dest/output"; then
    retry 3 cloud_sync pull "$dest/output" "$(dirname "$H5")" 2> >(stamp_lines) ||
      die "restore: pulling $dest/output failed"
  fi
  retry 3 cloud_sync pull "$dest/logs" "$TRIPLET_LOG_DIR" 2> >(stamp_lines) || warn "restore: logs not restored"
  # State last: it says which phases are done, so it may only arrive after what they produced.
  retry 3 cloud_sync pull "$dest/state" "$TRIPLET_STATE_DIR" --marker '*' 2> >(stamp_lines) ||
    die "restore: pulling $dest/state failed"
  log "restore: done; continuing from the restored state"
}

# --------------------------------------------------------------------------------------------- phases
# run_phase NAME FUNCTION: skipped when state/NAME.json says done and its output is still there.
run_phase() {
  local phase="$1" fn="$2" marker="$TRIPLET_STATE_DIR/$1.json" attempts rc=0 summary status
  mkdir -p "$TRIPLET_STATE_DIR" "$TRIPLET_RUN_DIR"
  if [[ "$(marker_get "$marker" status "")" == "done" ]]; then
    if phase_valid "$phase"; then
      log "phase $phase: done (attempts $(marker_get "$marker" attempts 0)); skipping"
      return 0
    fi
    warn "phase $phase: marked done but its output is not there any more; running it again"
  fi
  attempts=$(($(marker_get "$marker" attempts 0) + 1))
  summary="$TRIPLET_RUN_DIR/$phase.summary.json"
  rm -f "$summary"
  CURRENT_PHASE="$phase"
  marker_update "$marker" phase="$phase" status=running attempts:="$attempts" started_at="$(utc_now)" \
    host="$HOST" run_id="$(cfg run-id)" ended_at:=null exit_code:=null
  log "phase $phase: start (attempt $attempts)"
  event phase "phase $phase started" phase="$phase" status=running attempt:="$attempts" \
    run_id="$(cfg run-id)" preemptions:="$(marker_get "$TRIPLET_STATE_DIR/preemptions.json" count 0)"
  "$fn" "$summary" || rc=$?
  CURRENT_PHASE=""
  case "$rc" in
    0) status="done" ;;
    75 | 143) status=interrupted ;;
    *) status=failed ;;
  esac
  if [[ -f "$summary" ]]; then
    marker_update "$marker" status="$status" ended_at="$(utc_now)" exit_code:="$rc" --merge-file "$summary"
  else
    marker_update "$marker" status="$status" ended_at="$(utc_now)" exit_code:="$rc"
  fi
  log "phase $phase: $status (exit $rc)"
  TRIPLET_EVENT_SEVERITY="$([[ "$status" == failed ]] && echo ERROR || echo INFO)" \
    event phase "phase $phase $status" phase="$phase" status="$status" attempt:="$attempts" exit_code:="$rc" \
    run_id="$(cfg run-id)" preemptions:="$(marker_get "$TRIPLET_STATE_DIR/preemptions.json" count 0)"
  return "$rc"
}

phase_valid() {
  case "$1" in
    download)
      bash "$SELF_DIR/download_archives.sh" --manifest "$(manifest_path)" --dir "$TRIPLET_RAW_DIR" --verify-only
      ;;
    extract)
      [[ "$(cfg extract-archives)" == true ]] || return 0
      bash "$SELF_DIR/extract_archives.sh" --raw-dir "$TRIPLET_RAW_DIR" --extract-dir "$TRIPLET_EXTRACT_DIR" \
        --verify-only
      ;;
    preprocess)
      [[ "$(cfg mode)" != worker ]] || return 0
      load_engine_paths
      [[ -f "$H5" || "$(marker_get "$TRIPLET_STATE_DIR/finalize.json" status "")" == "done" ]]
      ;;
    *) return 0 ;;
  esac
}

# manifest_path: the manifest this machine downloads: the run's, or a worker's share of it.
manifest_path() {
  local full="$TRIPLET_CONFIG_DIR/manifest.txt" share="$TRIPLET_CONFIG_DIR/manifest.task.txt"
  if [[ "$(cfg mode)" != worker ]]; then
    printf '%s' "$full"
    return 0
  fi
  (cd "$TRIPLET_REPO_DIR" && vpy -m building_image_triplet_model.work_split --manifest "$full" \
    --task-index "$(cfg task-index)" --task-count "$(cfg task-count)") >"$share.tmp" ||
    die "cannot compute this task's share of $full"
  mv -f "$share.tmp" "$share"
  printf '%s' "$share"
}

phase_download() {
  mkdir -p "$TRIPLET_RAW_DIR"
  run_child bash "$SELF_DIR/download_archives.sh" \
    --manifest "$(manifest_path)" --dir "$TRIPLET_RAW_DIR" --summary-json "$1"
}

phase_extract() {
  local -a skip=()
  [[ "$(cfg extract-archives)" == true ]] || skip=(--skip)
  run_child bash "$SELF_DIR/extract_archives.sh" \
    --raw-dir "$TRIPLET_RAW_DIR" --extract-dir "$TRIPLET_EXTRACT_DIR" --summary-json "$1" "${skip[@]}"
}

engine_env() {
  local sync
  sync="$(cfg metadata-cache-sync-uri)"
  mkdir -p "$TRIPLET_CACHE_DIR/huggingface"
  ENGINE_ENV=(PYTHONUNBUFFERED=1 "HF_HOME=$TRIPLET_CACHE_DIR/huggingface")
  [[ -z "$sync" ]] || ENGINE_ENV+=("METADATA_CACHE_SYNC_URI=$sync")
}

phase_preprocess() {
  local summary="$1" rc=0 src=0
  load_engine_paths
  engine_env
  mkdir -p "$(dirname "$H5")"
  local -a args=(--config "$TRIPLET_CONFIG_DIR/preprocess.yaml")
  case "$(cfg mode)" in
    worker) args+=(--task-index "$(cfg task-index)" --task-count "$(cfg task-count)"
      --run-uri "$(cfg checkpoint-uri)/$(cfg run-id)") ;;
    merge) args+=(--merge --run-uri "$(cfg checkpoint-uri)/$(cfg run-id)" --wait-timeout-s "$(cfg merge-wait-s)") ;;
  esac
  log "preprocess: $TRIPLET_PROCESSOR_MODULE ${args[*]}"
  (close_lock_fds && cd "$TRIPLET_REPO_DIR" && exec env "${ENGINE_ENV[@]}" PYTHONPATH="${TRIPLET_REPO_DIR}${PYTHONPATH:+:$PYTHONPATH}" \
    "$TRIPLET_PYTHON" -m "$TRIPLET_PROCESSOR_MODULE" "${args[@]}") > >(stamp_lines) 2>&1 &
  TRIPLET_CHILD_PID=$!
  printf '%s\n' "$TRIPLET_CHILD_PID" >"$TRIPLET_RUN_DIR/engine.pid"
  wait "$TRIPLET_CHILD_PID" || rc=$?
  TRIPLET_CHILD_PID=""
  rm -f "$TRIPLET_RUN_DIR/engine.pid"
  case "$rc" in
    0) ;;
    75) log "preprocess: interrupted (exit 75); progress is durable, the next run continues"; return 75 ;;
    2) log "preprocess: configuration error (exit 2)"; return 2 ;;
    3) log "preprocess: input error (exit 3): missing or unreadable archives"; return 3 ;;
    4) log "preprocess: resume refused (exit 4): settings or inputs differ from the existing run; fix the" \
      "config, or remove $WORK to start fresh"; return 4 ;;
    5) log "preprocess: another processor holds the lock on $WORK (exit 5)"; return 5 ;;
    6) log "preprocess: the model or its pretrained weights could not be loaded (exit 6)"; return 6 ;;
    *) log "preprocess: the engine failed (exit $rc); see $ELOG"; return "$rc" ;;
  esac
  if [[ "$(cfg mode)" == worker ]]; then
    log "preprocess: this task's share is published under $(cfg checkpoint-uri)/$(cfg run-id)/shards"
    return 0
  fi
  (cd "$TRIPLET_REPO_DIR" && vpy -m "$TRIPLET_STATUS_MODULE" --config "$TRIPLET_CONFIG_DIR/preprocess.yaml" \
    --json >"$summary.status") || src=$?
  if ((src != 0)); then
    warn "preprocess: the engine exited 0 but the status report says work remains (exit $src)"
    return 1
  fi
  [[ -f "$H5" ]] || { warn "preprocess: $H5 missing after a complete run"; return 1; }
  helper json-update "$summary" artifact="$H5" artifact_bytes:="$(stat -c %s "$H5")" \
    --merge-file "$summary.status" --merge-key engine_status >/dev/null
  # The engine files go to the bucket before the marker says done.
  checkpoint full || true
}

phase_finalize() {
  local summary="$1" out_uri name info
  load_engine_paths
  [[ -f "$H5" ]] || { warn "finalize: $H5 not found"; return 1; }
  out_uri="$(cfg output-uri)"
  name="$(basename "$H5")"
  if [[ -z "$out_uri" ]]; then
    warn "finalize: no output-uri (and no checkpoint-uri): the artifact stays at $H5"
    helper json-update "$summary" artifact="$H5" uploaded:=false >/dev/null
    return 0
  fi
  out_uri="${out_uri%/}"
  log "finalize: uploading $H5 to $out_uri/$name (verified by size and CRC32C)"
  info="$(retry 5 cloud_sync cp "$H5" "$out_uri/$name" --json 2> >(stamp_lines))" ||
    { warn "finalize: upload failed"; return 1; }
  printf '%s\n' "$info" >"$TRIPLET_RUN_DIR/artifact.json"
  vpy - "$TRIPLET_RUN_DIR/artifact.json" "$summary" "$out_uri/$name" "$(cfg run-id)" <<'PY'
import json, sys, time
info = json.load(open(sys.argv[1]))
out = {"artifact_uri": sys.argv[3], "size": info["size"], "crc32c": info["crc32c"], "run_id": sys.argv[4],
       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
json.dump(out, open(sys.argv[2], "w"), indent=2)
PY
  # The commit marker beside the artifact, after it.
  retry 5 cloud_sync cp "$summary" "$out_uri/_SUCCESS.json" 2> >(stamp_lines) ||
    { warn "finalize: writing $out_uri/_SUCCESS.json failed"; return 1; }
}

when_done() {
  local action name zone project created group scope
  action="$(cfg on-done)"
  [[ "$action" != none ]] || { log "done: on-done=none; the VM keeps running"; return 0; }
  if ! metadata_on; then
    log "done: on-done=$action, but there is no metadata server (dry run): nothing to $action"
    return 0
  fi
  name="$(meta_value instance/name)" || die "done: cannot read instance/name"
  zone="$(meta_value instance/zone)" || die "done: cannot read instance/zone"
  zone="${zone##*/}"
  project="$(meta_value project/project-id)" || die "done: cannot read project/project-id"
  matches "$name" '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' || die "done: odd instance name"
  matches "$zone" '^[a-z]+-[a-z]+[0-9]+-[a-z]$' || die "done: odd zone"
  matches "$project" '^[a-z][-a-z0-9.:]{4,61}[a-z0-9]$' || die "done: odd project id"
  local -a cmd
  if [[ "$(cfg deploy-mode)" == mig ]]; then
    # In a managed group the VM must act through the group, or the group would recreate it.
    created="$(meta_value instance/attributes/created-by)" || die "done: deploy-mode mig, but no created-by metadata"
    matches "$created" '^projects/[^/]+/(zones|regions)/[a-z0-9-]+/instanceGroupManagers/[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' ||
      die "done: created-by is not an instance group manager"
    group="${created##*/}"
    scope="${created#projects/*/}"
    scope="${scope%%/instanceGroupManagers/*}"
    local where="--zone=${scope#zones/}"
    [[ "$scope" != regions/* ]] || where="--region=${scope#regions/}"
    case "$action" in
      stop) cmd=(compute instance-groups managed stop-instances "$group" --instances="$name" "$where") ;;
      delete) cmd=(compute instance-groups managed delete-instances "$group" --instances="$name" "$where") ;;
    esac
  else
    case "$action" in
      stop) cmd=(compute instances stop "$name" --zone="$zone") ;;
      delete) cmd=(compute instances delete "$name" --zone="$zone" --keep-disks=data) ;;
    esac
  fi
  cmd+=(--project="$project" --quiet)
  log "done: on-done=$action: gcloud ${cmd[*]} (the VM's service account)"
  event "on-done" "gcloud ${cmd[*]}" action="$action"
  retry 5 run_logged "$TRIPLET_GCLOUD" "${cmd[@]}"
}

# ---------------------------------------------------------------------------------------------- job
# The job: download -> extract -> preprocess -> finalize -> on-done, each phase skipped when its marker says
# done. What the systemd unit runs (or this script itself, in direct mode).
cmd_job() {
  local rc=0
  mkdir -p "$TRIPLET_RUN_DIR"
  exec {JOB_LOCK_FD}>>"$TRIPLET_JOB_LOCK_FILE"
  if ! flock -n "$JOB_LOCK_FD"; then
    log "job: another job holds $TRIPLET_JOB_LOCK_FILE; not starting a second one"
    return 0
  fi
  printf '%s\n' "$$" >"$TRIPLET_RUN_DIR/job.pid"
  if [[ "$(cfg mode)" == merge ]]; then
    log "job: mode merge: no download or extraction (the merge reads the workers' shards)"
  else
    run_phase download phase_download || rc=$?
    checkpoint small || true
    ((rc == 0)) || return "$rc"
    run_phase extract phase_extract || rc=$?
    checkpoint small || true
    ((rc == 0)) || return "$rc"
  fi
  preprocess_with_checkpoints || rc=$?
  if ((rc != 0)); then
    checkpoint small || true
    return "$rc"
  fi
  if [[ "$(cfg mode)" != worker ]]; then
    run_phase finalize phase_finalize || rc=$?
  fi
  if ((rc == 0)) && [[ "$(marker_get "$TRIPLET_STATE_DIR/done.json" status "")" != "done" ]]; then
    local -a fin=()
    [[ ! -f "$TRIPLET_STATE_DIR/finalize.json" ]] || fin=(--merge-file "$TRIPLET_STATE_DIR/finalize.json" --merge-key finalize)
    marker_update "$TRIPLET_STATE_DIR/done.json" status=done run_id="$(cfg run-id)" mode="$(cfg mode)" \
      finished_at="$(utc_now)" "${fin[@]}"
    event "done" "run $(cfg run-id) complete" status="done" run_id="$(cfg run-id)"
    log "done: $(cfg run-id) complete"
  fi
  checkpoint small || true
  ((rc == 0)) || return "$rc"
  when_done
}

# The preprocess phase with a checkpoint every checkpoint-interval-s meanwhile.
preprocess_with_checkpoints() {
  local rc=0
  if ckpt_dest >/dev/null; then
    checkpoint_loop &
    CKPT_LOOP_PID=$!
  fi
  run_phase preprocess phase_preprocess || rc=$?
  stop_checkpoint_loop
  return "$rc"
}

stop_checkpoint_loop() {
  if [[ -n "$CKPT_LOOP_PID" ]]; then
    kill_tree "$CKPT_LOOP_PID" TERM
    kill -TERM "$CKPT_LOOP_PID" 2>/dev/null || true
    wait "$CKPT_LOOP_PID" 2>/dev/null || true
    CKPT_LOOP_PID=""
  fi
}

# start: the job as its own systemd unit (the startup unit then finishes; systemd stops the job properly at
# shutdown), or here in the foreground in direct mode (no systemd: dry runs, CI, Cloud Batch tasks).
step_start() {
  local mode
  mode="$(run_mode)"
  if [[ "$mode" == direct ]]; then
    log "start: direct mode: running the job in the foreground"
    cmd_job
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
    "${setenv[@]}" --setenv=TRIPLET_LOG_FILE= --setenv=TRIPLET_EVENTS_FILE= --setenv=HOME="${HOME:-/root}" \
    /bin/bash "$SELF" job
}

step_status() {
  local p
  for p in download extract preprocess finalize "done"; do
    if [[ -f "$TRIPLET_STATE_DIR/$p.json" ]]; then
      log "state: $p: $(marker_get "$TRIPLET_STATE_DIR/$p.json" status '?') (attempts $(marker_get "$TRIPLET_STATE_DIR/$p.json" attempts 0))"
    else
      log "state: $p: pending"
    fi
  done
  if [[ -f "$TRIPLET_STATE_DIR/preemptions.json" ]]; then
    log "state: preemptions: $(marker_get "$TRIPLET_STATE_DIR/preemptions.json" count 0)"
  fi
  if [[ -f "$TRIPLET_CONFIG_DIR/preprocess.yaml" && -x "$TRIPLET_PYTHON" ]]; then
    (cd "$TRIPLET_REPO_DIR" && vpy -m "$TRIPLET_STATUS_MODULE" --config "$TRIPLET_CONFIG_DIR/preprocess.yaml") || true
  fi
}

step_paths() {
  local v
  for v in SELF TRIPLET_MOUNT_RAW TRIPLET_MOUNT_WORK TRIPLET_REPO_DIR TRIPLET_STATE_DIR TRIPLET_LOG_DIR \
    TRIPLET_CONFIG_DIR TRIPLET_OUTPUT_DIR TRIPLET_RAW_DIR TRIPLET_ARCHIVE_DIR TRIPLET_EXTRACT_DIR TRIPLET_RUN_DIR; do
    printf '%s=%s\n' "$v" "${!v}"
  done
}

# --------------------------------------------------------------------------------------------- signals
on_term() {
  trap '' TERM INT
  log "SIGTERM: stopping (phase ${CURRENT_PHASE:-none}); children get ${TRIPLET_SHUTDOWN_GRACE_S}s to save"
  local -a pids=()
  local p wd
  if [[ -n "$TRIPLET_CHILD_PID" ]]; then
    pids+=("$TRIPLET_CHILD_PID")
    kill -TERM "$TRIPLET_CHILD_PID" 2>/dev/null || true
  fi
  if [[ -n "$CKPT_LOOP_PID" ]]; then
    kill_tree "$CKPT_LOOP_PID" TERM
    kill -TERM "$CKPT_LOOP_PID" 2>/dev/null || true
    pids+=("$CKPT_LOOP_PID")
    CKPT_LOOP_PID=""
  fi
  if ((${#pids[@]})); then
    (
      trap - TERM INT
      sleep "$TRIPLET_SHUTDOWN_GRACE_S"
      kill -KILL "${pids[@]}" 2>/dev/null
    ) &
    wd=$!
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    kill "$wd" 2>/dev/null || true
  fi
  if [[ -n "$CURRENT_PHASE" ]]; then
    marker_update "$TRIPLET_STATE_DIR/$CURRENT_PHASE.json" status=interrupted ended_at="$(utc_now)" exit_code:=143 ||
      true
  fi
  exit 143
}

on_exit() {
  stop_checkpoint_loop
  if [[ -f "$TRIPLET_RUN_DIR/startup.pid" && "$(<"$TRIPLET_RUN_DIR/startup.pid")" == "$$" ]]; then
    rm -f "$TRIPLET_RUN_DIR/startup.pid"
  fi
  if [[ -f "$TRIPLET_RUN_DIR/job.pid" && "$(<"$TRIPLET_RUN_DIR/job.pid")" == "$$" ]]; then
    rm -f "$TRIPLET_RUN_DIR/job.pid"
  fi
}

# ------------------------------------------------------------------------------------------------ main
main() {
  local -a steps=("$@")
  ((${#steps[@]})) || steps=(all)
  if [[ "${steps[0]}" == -h || "${steps[0]}" == --help ]]; then
    sed -n '2,/^set -Eeuo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'
    return 0
  fi
  if [[ "${steps[*]}" == all ]]; then steps=("${ALL_STEPS[@]}"); fi
  local s
  for s in "${steps[@]}"; do
    case "$s" in
      system | disks | repo | uv | config | ops-agent | restore | download | extract | preprocess | start | job | \
        checkpoint | status | paths) ;;
      *) echo "startup_preprocess.sh: unknown step '$s' (see --help)" >&2; return 2 ;;
    esac
  done
  if [[ "${steps[*]}" == paths ]]; then step_paths; return 0; fi

  mkdir -p "$TRIPLET_RUN_DIR"
  trap on_term TERM INT
  trap on_exit EXIT
  if [[ "${steps[*]}" != job && "${steps[*]}" != status ]]; then
    if [[ "${TRIPLET_LOCK_HELD:-0}" != 1 ]]; then
      exec {TRIPLET_LOCK_FD}>>"$TRIPLET_LOCK_FILE"
      if ! flock -n "$TRIPLET_LOCK_FD"; then
        log "another startup_preprocess.sh holds $TRIPLET_LOCK_FILE; exiting"
        return 0
      fi
      export TRIPLET_LOCK_HELD=1 TRIPLET_LOCK_FD
    fi
    printf '%s\n' "$$" >"$TRIPLET_RUN_DIR/startup.pid"
  fi
  # The work disk may not be mounted before the disks step: log to the journal only until then.
  if [[ "${steps[*]}" != status ]] && { [[ " ${steps[*]} " != *" disks "* ]] || is_true "$TRIPLET_SKIP_DISKS"; }; then
    mkdir -p "$TRIPLET_MOUNT_WORK"
    if [[ "${steps[*]}" == job ]]; then start_log_file job; else start_log_file startup; fi
  fi
  log "steps: ${steps[*]} (mode $(run_mode), metadata $TRIPLET_METADATA)"

  local i
  for i in "${!steps[@]}"; do
    s="${steps[$i]}"
    case "$s" in
      system) step_system ;;
      disks)
        step_disks
        start_log_file startup
        ;;
      repo)
        step_repo
        # Continue with the checkout's own copy of this script (it may be newer than the running one).
        local mine="$TRIPLET_REPO_DIR/gcp/scripts/startup_preprocess.sh"
        if [[ "${TRIPLET_REEXECED:-0}" != 1 && -f "$mine" && "$(readlink -f "$mine")" != "$SELF" ]] &&
          ((i + 1 < ${#steps[@]})); then
          log "repo: continuing with $mine"
          trap - EXIT
          rm -f "$TRIPLET_RUN_DIR/startup.pid"
          TRIPLET_REEXECED=1 exec bash "$mine" "${steps[@]:$((i + 1))}"
        fi
        ;;
      uv) step_uv ;;
      config) step_config ;;
      ops-agent) step_ops_agent ;;
      restore) step_restore ;;
      download | extract)
        if [[ "$(cfg mode)" == merge ]]; then
          log "$s: not needed by the merge (it reads the workers' shards)"
          continue
        fi
        run_phase "$s" "phase_$s"
        checkpoint small || true
        ;;
      preprocess) preprocess_with_checkpoints ;;
      start) step_start ;;
      job) cmd_job ;;
      checkpoint) checkpoint full ;;
      status) step_status ;;
    esac
  done
}

main "$@"
