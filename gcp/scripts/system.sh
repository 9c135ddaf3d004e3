#!/usr/bin/env bash
# The `system` step: Debian packages, uv, and the NVIDIA driver. Sourced by startup_preprocess.sh.
#
# The driver is Debian 12's own (non-free; the 535 branch, CUDA 12.2 class), built by DKMS for the kernel;
# why this branch: README "The GPU stack". The locked torch is a CUDA 12 build, which runs on it through
# CUDA's minor-version compatibility (tests/gcp/test_gpu_stack.py). Headless: `nvidia-driver` would bring the
# X server's driver and, with --no-install-recommends, NOT libcuda1 (libcuda.so.1, what torch loads: only a
# Recommends), so the set is named package by package. tests/pristine/test_gpu_install.py installs exactly
# this set into a pristine Debian 12 root. Cloud Batch workers get the driver the same way
# (installGpuDrivers is false in gcp/batch/*.json): one path for every VM.
# shellcheck shell=bash

# The module (DKMS; its GSP firmware and dkms/gcc come as dependencies), the CUDA driver library
# (libcuda.so.1 + the PTX JIT), NVML and nvidia-smi, and the persistence daemon (no display keeps the driver
# initialised between processes). One line: the tests and benchmarks/bench_bootstrap.py read it.
NVIDIA_DRIVER_PACKAGES=(nvidia-kernel-dkms libcuda1 libnvidia-ml1 nvidia-smi nvidia-persistenced)
# What apt-mark holds once the driver is in (extended regular expression on package names): the driver's
# packages and the kernel's. Unattended upgrades (bookworm-security carries the driver) would otherwise swap
# the user-space libraries under a running job ("driver/library version mismatch" until a reboot).
NVIDIA_HOLD_PATTERN='^(nvidia-|libnvidia-|libcuda1|firmware-nvidia-|linux-image-|linux-headers-)'
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

apt_update() {
  repair_dpkg
  retry 5 run_logged apt-get update -q
}

apt_install_only() { # packages -> installed, no update first
  retry 3 run_logged apt-get install -y -q --no-install-recommends "$@"
}

apt_install() {
  apt_update
  apt_install_only "$@"
}

apt_has() { # package -> 0 when apt has a candidate for it
  local policy # not piped into grep -q: its early exit would fail the pipe (pipefail)
  policy="$(apt-cache policy "$1" 2>/dev/null)" || return 1
  [[ $policy =~ Candidate:\ [^\(] ]]
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

# The kernel flavour of a Debian kernel release (6.1.0-28-cloud-amd64, 6.12.9+deb12-cloud-amd64 ->
# cloud-amd64); GCE's images boot the cloud flavour, which any other release name is taken for.
kernel_flavour() {
  local release=$1
  if [[ $release =~ ^[0-9.]+(-[0-9]+|\+deb[0-9][^-]*)-([a-z0-9-]+)$ ]]; then
    printf '%s\n' "${BASH_REMATCH[2]}"
  else
    printf 'cloud-amd64\n'
  fi
}

# The driver's packages and the kernel's are held (see NVIDIA_HOLD_PATTERN).
hold_gpu_stack() {
  local -a held
  # shellcheck disable=SC2016 # dpkg-query's format, not a shell expansion
  mapfile -t held < <(dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' 2>/dev/null |
    awk -v re="$NVIDIA_HOLD_PATTERN" '$1 ~ /^.i/ && $2 ~ re {print $2}')
  ((${#held[@]})) || return 0
  run_logged apt-mark hold "${held[@]}" || die "system: apt-mark hold ${held[*]} failed"
}

# Debian's apt entries with contrib, non-free and non-free-firmware (the driver lives in non-free), updated.
enable_nonfree() {
  # shellcheck disable=SC2086 # a list of globs
  sysvm vm.apt_sources $TRIPLET_APT_SOURCES >/dev/null
  apt_update
}

# The headers of kernel release $1, for DKMS to build the module against. Where Debian's archive keeps none
# for it (an image booting an older kernel ABI), the current kernel of its flavour and that kernel's headers
# instead: DKMS builds the module for THAT kernel, and TRIPLET_KERNEL_CHANGED=1 says that only a reboot into
# it loads the driver. Not the flavour's header package beside the running kernel's: it would bring a newer
# ABI's headers, and DKMS would build the module a second time for a kernel that is not installed (the
# kernel is held, so no update needs them).
install_kernel_headers() {
  local release=$1 flavour
  flavour="$(kernel_flavour "$release")"
  TRIPLET_KERNEL_CHANGED=0
  if apt_has "linux-headers-$release"; then
    log "system: installing the headers of kernel $release"
    apt_install_only "linux-headers-$release"
  else
    warn "system: Debian's archive keeps no linux-headers-$release (the image boots an older kernel ABI);" \
      "installing the current $flavour kernel and its headers (the driver loads after one reboot)"
    apt_install_only "linux-image-$flavour" "linux-headers-$flavour"
    TRIPLET_KERNEL_CHANGED=1
  fi
}

# The headless driver set, then held. Its postinst builds the module for every kernel with headers.
install_driver_set() {
  log "system: installing Debian's NVIDIA driver (${NVIDIA_DRIVER_PACKAGES[*]}), built by DKMS"
  apt_install_only "${NVIDIA_DRIVER_PACKAGES[@]}"
  hold_gpu_stack
}

# Everything, for kernel release $1 (default: the running one); the headers go first.
install_gpu_stack() {
  enable_nonfree
  install_kernel_headers "${1:-$(uname -r)}"
  install_driver_set
}

reboot_once() { # reason -> reboots (once per boot disk) or returns 1
  mkdir -p "$TRIPLET_SYSTEM_STATE_DIR"
  if is_true "$TRIPLET_ALLOW_REBOOT" && [[ ! -e "$TRIPLET_SYSTEM_STATE_DIR/driver-reboot-done" ]]; then
    utc_now >"$TRIPLET_SYSTEM_STATE_DIR/driver-reboot-done"
    log "system: $1; rebooting once"
    "$TRIPLET_SYSTEMCTL" reboot
    exit 0
  fi
  return 1
}

install_nvidia() {
  local gpu
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
  install_gpu_stack
  if ((TRIPLET_KERNEL_CHANGED)); then
    reboot_once "the driver was built for the current $(kernel_flavour "$(uname -r)") kernel, not the running $(uname -r)" ||
      die "system: still running kernel $(uname -r) after the reboot into the current one, and Debian keeps no headers for it: choose the newest kernel at boot (grub), or use a newer image"
  fi
  # nouveau may hold the GPU on a fresh image; without a display it can be unloaded instead of rebooting.
  modprobe -r nouveau 2>/dev/null || true
  modprobe nvidia 2>/dev/null || true
  if nvidia-smi >/dev/null 2>&1; then
    log "system: NVIDIA driver loaded: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    return 0
  fi
  reboot_once "the driver needs a reboot to load (nouveau in use, or a new kernel)" ||
    die "system: the NVIDIA driver is installed but nvidia-smi fails (secure boot on? see journalctl -k)"
}

# The packages of the tools GCE's debian-12 image lacks, one a line.
missing_base_packages() {
  command -v aria2c >/dev/null 2>&1 || echo aria2
  command -v git >/dev/null 2>&1 || echo git
  command -v curl >/dev/null 2>&1 || echo curl
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || echo python3-venv
  # torch.compile (triton, inductor) builds C helpers with gcc against Python.h; Debian's python3 has no
  # headers without python3-dev. The engine's preflight refuses compile: true without them.
  python3 -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' \
    >/dev/null 2>&1 || echo python3-dev
  command -v gcc >/dev/null 2>&1 || echo gcc
}

step_system() {
  if is_true "${TRIPLET_SKIP_SYSTEM:-0}"; then
    log "system: skipped (TRIPLET_SKIP_SYSTEM=1)"
    return 0
  fi
  repair_dpkg
  local -a need
  mapfile -t need < <(missing_base_packages)
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
  local cache held
  if nvidia_present; then
    # An image without libcuda.so.1 or without the holds would fail (or drift) on every VM of the run.
    cache="$(ldconfig -p)" || die "bake: ldconfig -p failed"
    held="$(apt-mark showhold)" || die "bake: apt-mark showhold failed"
    [[ $cache == *"libcuda.so.1 "* ]] || die "bake: libcuda.so.1 is not installed: not baking this disk"
    [[ $'\n'$held$'\n' == *$'\n'libcuda1$'\n'* ]] || die "bake: the NVIDIA driver is not held: not baking this disk"
  fi
  apt-get clean
  rm -f "$TRIPLET_SYSTEM_STATE_DIR/driver-reboot-done"
  log "bake: the system step is done; powering off (the disk becomes the image)"
  "$TRIPLET_SYSTEMCTL" poweroff
}
