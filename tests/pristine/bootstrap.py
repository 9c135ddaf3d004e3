"""The bootstrap's own bash (gcp/scripts/lib.sh + system.sh) and Python (building_image_triplet_model, run by
Debian's python3 as ``sysvm``) copied into a pristine root, and its functions run there in a chroot: what the
VM's `system` step does, package for package."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pristine import root as pristine

REPO = pristine.REPO
IN_ROOT = "/opt/triplet-repo"  # where the copy lives inside the root
SYSTEM_SH = REPO / "gcp" / "scripts" / "system.sh"


def system_sh_array(name: str) -> list[str]:
    """A bash array of system.sh (NVIDIA_DRIVER_PACKAGES), read by bash itself: the one definition."""
    body = f'set -Eeuo pipefail; source "$1"; printf "%s\\n" "${{{name}[@]}}"'
    r = subprocess.run(
        ["bash", "-c", body, "-", str(SYSTEM_SH)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return r.stdout.split()


def copy_bootstrap(root: Path) -> None:
    dest = root / IN_ROOT.lstrip("/")
    (dest / "gcp" / "scripts").mkdir(parents=True, exist_ok=True)
    for name in ("lib.sh", "system.sh"):
        shutil.copy(REPO / "gcp" / "scripts" / name, dest / "gcp" / "scripts" / name)
    shutil.copytree(
        REPO / "building_image_triplet_model",
        dest / "building_image_triplet_model",
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )


def run_system_sh(root: Path, body: str, timeout: float = 1800, **env: str) -> subprocess.CompletedProcess:
    """``body`` (bash) after sourcing the bootstrap's lib.sh and system.sh, in a chroot of ``root``."""
    copy_bootstrap(root)
    script = (
        f"set -Eeuo pipefail; source {IN_ROOT}/gcp/scripts/lib.sh; source {IN_ROOT}/gcp/scripts/system.sh; "
        + body
    )
    return pristine.run_in_root(
        root, ["bash", "-c", script], env={**pristine.DEFAULT_ENV, **env}, timeout=timeout
    )


def installed(root: Path) -> dict[str, str]:
    """Package -> version of what dpkg has installed in the root."""
    r = subprocess.run(
        [
            "dpkg-query",
            f"--admindir={root}/var/lib/dpkg",
            "-W",
            "-f",
            "${db:Status-Abbrev}\t${Package}\t${Version}\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = (line.split("\t") for line in r.stdout.splitlines())
    # The second letter of the status is the state: "ii" installed, "hi" installed and held.
    return {pkg: version for status, pkg, version in rows if status[1:2] == "i"}
