#!/usr/bin/env bash
# The `disks` step: the raw disk on /mnt/raw and the work disk on /mnt/work, found by their device names
# (/dev/disk/by-id/google-NAME). A disk is formatted only when nothing is on it: blkid's query and its
# low-level probe must both find no filesystem, and a partition table is refused. Sourced by
# startup_preprocess.sh.
# shellcheck shell=bash

: "${TRIPLET_RAW_DISK:=raw-data-1tb}"
: "${TRIPLET_WORK_DISK:=work-scratch-512gb}"
: "${TRIPLET_DISK_BY_ID_DIR:=/dev/disk/by-id}"
: "${TRIPLET_FSTAB:=/etc/fstab}"
: "${TRIPLET_SYSTEMD_UNIT_DIR:=/etc/systemd/system}"

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
  if is_true "${TRIPLET_SKIP_DISKS:-0}"; then
    log "disks: skipped (TRIPLET_SKIP_DISKS=1); using folders $TRIPLET_MOUNT_RAW and $TRIPLET_MOUNT_WORK"
    mkdir -p "$TRIPLET_MOUNT_RAW" "$TRIPLET_MOUNT_WORK"
    return 0
  fi
  mount_disk "$TRIPLET_RAW_DISK" "$TRIPLET_MOUNT_RAW" raw
  mount_disk "$TRIPLET_WORK_DISK" "$TRIPLET_MOUNT_WORK" work
  order_shutdown_after_mounts
}

# The fstab lines are `nofail`, so their mount units are not ordered before local-fs.target, and nothing
# keeps them mounted while the guest agent's shutdown unit runs the shutdown script, which reads the work disk
# (markers, the environment) and pushes from it. A drop-in orders that unit after the mounts, so that at
# shutdown it stops (runs the script) before they are unmounted. (The job's own unit requires its mounts:
# startup_preprocess.sh's start step.)
order_shutdown_after_mounts() {
  [[ -d /run/systemd/system ]] || return 0
  local dir="$TRIPLET_SYSTEMD_UNIT_DIR/google-shutdown-scripts.service.d" text
  text="$(printf '[Unit]\nRequiresMountsFor=%s %s\n' "$TRIPLET_MOUNT_RAW" "$TRIPLET_MOUNT_WORK")"
  [[ "$(cat "$dir/triplet-mounts.conf" 2>/dev/null)" != "$text" ]] || return 0
  mkdir -p "$dir"
  printf '%s\n' "$text" >"$dir/triplet-mounts.conf"
  "${TRIPLET_SYSTEMCTL:-systemctl}" daemon-reload || warn "disks: systemctl daemon-reload failed"
  log "disks: the shutdown script's unit now stops before $TRIPLET_MOUNT_RAW and $TRIPLET_MOUNT_WORK are unmounted"
}

