#!/usr/bin/env bash
# The `system` step: Debian packages, uv, and the NVIDIA driver. Sourced by startup_preprocess.sh.
#
# The driver is Debian 12's own `nvidia-driver` (non-free; the 535 branch, CUDA 12.2 class), built by DKMS
# for the running kernel. The lock's torch is a CUDA 12 build (pyproject.toml), which runs on it through
# CUDA's minor-version compatibility; tests/gcp/test_gpu_stack.py asks this machine's apt what the
# candidate is and checks the pair against NVIDIA's minimum-driver table. Cloud Batch workers get the driver
# the same way (installGpuDrivers is false in gcp/batch/*.json): one path for every VM.
# shellcheck shell=bash

NVIDIA_DRIVER_PACKAGES=(nvidia-driver firmware-misc-nonfree nvidia-smi)
: "${TRIPLET_APT_SOURCES:=/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources}"
: "${TRIPLET_DPKG_OPTS:=}" # tests point dpkg at a private database (--root=... --admindir=...)
: "${TRIPLET_UV_VERSION:=0.13.9}"
: "${TRIPLET_UV_VENV:=/opt/triplet-uv}"
: "${TRIPLET_UV:=uv}"
: "${TRIPLET_ALLOW_REBOOT:=1}"
: "${TRIPLET_SYSTEMCTL:=systemctl}"
export DEBIAN_FRONTEND=noninteractive

dpkg_() {
  local -a opts=()
  # shellcheck disable=SC2206 # a list of options, split on purpose
  [[ -z "$TRIPLET_DPKG_OPTS" ]] || opts=($TRIPLET_DPKG_OPTS)
  dpkg "${opts[@]}" "$@"
}

# A preemption during apt-get or dpkg leaves packages half-configured, and apt then refuses to run until
# `dpkg --configure -a`: every boot repairs that first.
repair_dpkg() {
  local broken
  broken="$(dpkg_ --audit 2>/dev/null || true)"
  [[ -n "$broken" ]] || return 0
  warn "system: dpkg was interrupted (a preemption during apt?); repairing with dpkg --configure -a"
  run_logged dpkg_ --configure -a ||
    die "system: dpkg --configure -a failed: apt cannot run on this boot disk"
}

apt_install() {
  repair_dpkg
  retry 5 run_logged apt-get update -q
  retry 3 run_logged apt-get install -y -q --no-install-recommends "$@"
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

nvidia_present() {
  local v
  for v in /sys/bus/pci/devices/*/vendor; do
    [[ -r "$v" && "$(<"$v")" == 0x10de ]] && return 0
  done
  return 1
}

install_nvidia() {
  local gpu flavour
  gpu="$(sysvm vm.settings get gpu-driver)" || die "system: setting gpu-driver is invalid"
  if [[ "$gpu" == skip ]]; then
    log "system: NVIDIA driver skipped (gpu-driver=skip)"
    return 0
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    log "system: NVIDIA driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1) is loaded"
    return 0
  fi
  if ! nvidia_present; then
    log "system: no NVIDIA device on the PCI bus; driver not installed"
    return 0
  fi
  # The flavour's header package (linux-headers-cloud-amd64) as well: a kernel update then brings its
  # headers, and DKMS builds the module for it before the next boot.
  flavour="$(uname -r | sed -E 's/^[0-9.]+-[0-9]+-//')"
  log "system: installing Debian's NVIDIA driver (${NVIDIA_DRIVER_PACKAGES[*]}), built by DKMS for $(uname -r)"
  # shellcheck disable=SC2086 # a list of globs
  sysvm vm.apt_sources $TRIPLET_APT_SOURCES >/dev/null
  apt_install "linux-headers-$(uname -r)" "linux-headers-$flavour" "${NVIDIA_DRIVER_PACKAGES[@]}"
  # nouveau may hold the GPU on a fresh image; without a display it can be unloaded instead of rebooting.
  modprobe -r nouveau 2>/dev/null || true
  modprobe nvidia 2>/dev/null || true
  if nvidia-smi >/dev/null 2>&1; then
    log "system: NVIDIA driver loaded: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    return 0
  fi
  mkdir -p "$TRIPLET_SYSTEM_STATE_DIR"
  if is_true "$TRIPLET_ALLOW_REBOOT" && [[ ! -e "$TRIPLET_SYSTEM_STATE_DIR/driver-reboot-done" ]]; then
    utc_now >"$TRIPLET_SYSTEM_STATE_DIR/driver-reboot-done"
    log "system: the driver needs a reboot to load (nouveau in use, or a new kernel); rebooting once"
    "$TRIPLET_SYSTEMCTL" reboot
    exit 0
  fi
  die "system: the NVIDIA driver is installed but nvidia-smi fails (secure boot on? see journalctl -k)"
}

step_system() {
  if is_true "${TRIPLET_SKIP_SYSTEM:-0}"; then
    log "system: skipped (TRIPLET_SKIP_SYSTEM=1)"
    return 0
  fi
  repair_dpkg
  local -a need=()
  command -v aria2c >/dev/null 2>&1 || need+=(aria2)
  command -v git >/dev/null 2>&1 || need+=(git)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
  if ((${#need[@]})); then
    log "system: installing ${need[*]}"
    apt_install ca-certificates "${need[@]}"
  fi
  install_uv
  install_nvidia
}

# The builder VM of `gcp/provision.sh image`: its boot disk becomes the image every VM of the run boots
# from, so what belongs to this one VM stays off it: apt's downloaded packages and the marker of its one
# driver reboot (a VM from the image must get its own). Its log went to the journal only (main).
step_bake() {
  apt-get clean
  rm -f "$TRIPLET_SYSTEM_STATE_DIR/driver-reboot-done"
  log "bake: the system step is done; powering off (the disk becomes the image)"
  "$TRIPLET_SYSTEMCTL" poweroff
}
