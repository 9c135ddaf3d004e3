"""The disks step on real loop devices, named /dev/disk/by-id/google-NAME inside a private mount namespace.

Formatting happens only when blkid finds nothing on a disk: a disk with a filesystem (and no marker file of
ours) is mounted as it is; a disk with a partition table but no filesystem is refused.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from gcp_helpers import SCRIPTS, LoopDisks, script_env


def disk_env(tmp: Path) -> dict[str, str]:
    return script_env(
        tmp,
        TRIPLET_SKIP_DISKS="0",
        TRIPLET_FSTAB=str(tmp / "fstab"),
        TRIPLET_MOUNT_RAW=str(tmp / "mnt" / "raw"),
        TRIPLET_MOUNT_WORK=str(tmp / "mnt" / "work"),
    )


def disks_step(tmp: Path) -> str:
    return f"bash {SCRIPTS / 'startup_preprocess.sh'} disks"


def blkid_type(dev: str) -> str:
    return subprocess.run(
        ["blkid", "-o", "value", "-s", "TYPE", dev], capture_output=True, text=True
    ).stdout.strip()


def test_blank_disks_are_formatted_mounted_and_in_fstab_once(tmp_path: Path, loop_disks: LoopDisks) -> None:
    env = disk_env(tmp_path)
    raw, work = tmp_path / "mnt" / "raw", tmp_path / "mnt" / "work"
    script = f"""
{disks_step(tmp_path)} || exit 10
findmnt -n -o SOURCE --target {raw}; findmnt -n -o SOURCE --target {work}
echo kept > {work}/written-while-mounted.txt
{disks_step(tmp_path)} || exit 11   # every boot: idempotent
"""
    r = loop_disks.run(script, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert loop_disks.devices["raw-data-1tb"] in r.stdout
    assert loop_disks.devices["work-scratch-512gb"] in r.stdout
    assert "has no filesystem: formatting ext4" in r.stderr
    assert "already mounted" in r.stderr
    for dev in loop_disks.devices.values():
        assert blkid_type(dev) == "ext4"
    lines = [ln for ln in (tmp_path / "fstab").read_text().splitlines() if ln.strip()]
    assert len(lines) == 2, lines
    for ln, mnt in zip(sorted(lines, key=lambda x: x.split()[1]), (str(raw), str(work)), strict=True):
        uuid, point, fstype, opts = ln.split()[:4]
        assert uuid.startswith("UUID=")
        assert (point, fstype) == (mnt, "ext4")
        assert "nofail" in opts.split(",")


def test_a_disk_with_a_filesystem_is_never_formatted(tmp_path: Path, loop_disks: LoopDisks) -> None:
    env = disk_env(tmp_path)
    dev = loop_disks.devices["work-scratch-512gb"]
    subprocess.run(["mkfs.ext4", "-q", "-L", "mine", dev], check=True)
    uuid_before = subprocess.run(
        ["blkid", "-o", "value", "-s", "UUID", dev], capture_output=True, text=True
    ).stdout
    # Data on it, and none of our marker files: a missing marker is never a reason to format.
    script = f"""
mkdir -p {tmp_path}/m && mount {dev} {tmp_path}/m && echo precious > {tmp_path}/m/data.txt
umount {tmp_path}/m
{disks_step(tmp_path)} || exit 10
cat {tmp_path}/mnt/work/data.txt
"""
    r = loop_disks.run(script, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "precious" in r.stdout
    assert f"{dev} (work-scratch-512gb) holds ext4: not formatting" in r.stderr
    uuid_after = subprocess.run(
        ["blkid", "-o", "value", "-s", "UUID", dev], capture_output=True, text=True
    ).stdout
    assert uuid_after == uuid_before


def test_a_partition_table_without_filesystem_is_refused(tmp_path: Path, loop_disks: LoopDisks) -> None:
    env = disk_env(tmp_path)
    dev = loop_disks.devices["raw-data-1tb"]
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 1000)
    mbr[510:512] = b"\x55\xaa"
    with open(dev, "r+b") as f:
        f.write(mbr)
    r = loop_disks.run(disks_step(tmp_path), env)
    assert r.returncode != 0
    assert "partition table and no filesystem: refusing to format it" in r.stderr
    assert blkid_type(dev) == ""


def test_a_missing_disk_is_a_clear_error(tmp_path: Path, loop_disks: LoopDisks) -> None:
    env = disk_env(tmp_path)
    env["TRIPLET_WORK_DISK"] = "work-disk-that-is-not-attached"
    r = loop_disks.run(disks_step(tmp_path), env)
    assert r.returncode != 0
    assert "google-work-disk-that-is-not-attached not found" in r.stderr
    assert "attached" in r.stderr
