"""The GPU stack the VM gets: Debian 12's NVIDIA driver (what this machine's apt, Debian 12 like the VM, would
install with the components the bootstrap enables) must run the CUDA build of torch that uv.lock pins, and
system.sh's headless set must bring libcuda.so.1 and no X server. These are fast checks that ask apt; the
real install into a pristine root is tests/pristine/test_gpu_install.py.

apt runs with a private configuration (its own state, cache and sources; the host's apt is not touched): the
host's Debian entries, plus the bookworm-backports stanza of GCE's debian-12 image, with contrib, non-free and
non-free-firmware enabled by the bootstrap's own ``vm.apt_sources``. No mirror, no answer: the test fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from engine_helpers import REPO
from gcp_helpers import SCRIPTS

from building_image_triplet_model.vm import gpu_stack

BACKPORTS = """Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# The lock before the fix: torch 2.15 built for CUDA 13, which Debian 12's 535 driver cannot run.
PRE_FIX_COMMIT = "3a55273"


# What system.sh installed before the headless set: nvidia-driver's Recommends hold libcuda1, and
# --no-install-recommends drops it, while its Depends bring the X server's driver.
PRE_FIX_PACKAGES = ["nvidia-driver", "firmware-misc-nonfree", "nvidia-smi"]


def system_sh(body: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``body`` after sourcing system.sh (its definitions only), in bash."""
    return subprocess.run(
        ["bash", "-c", f'set -Eeuo pipefail; source "$1"; {body}', "-", str(SCRIPTS / "system.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def driver_packages() -> list[str]:
    """system.sh's NVIDIA_DRIVER_PACKAGES, read by bash itself."""
    r = system_sh('printf "%s\\n" "${NVIDIA_DRIVER_PACKAGES[@]}"')
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def driver_package() -> str:
    """The package whose version is the driver torch talks to: libcuda1 (libcuda.so.1), one of the set."""
    assert "libcuda1" in driver_packages()
    return "libcuda1"


def private_apt(tmp: Path) -> list[str]:
    """apt options for a configuration of its own under ``tmp``, with the VM's sources."""
    etc = tmp / "etc"
    parts = etc / "sources.list.d"
    for d in (parts, etc / "preferences.d", tmp / "state" / "lists" / "partial", tmp / "cache" / "archives"):
        d.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        shutil.copy(legacy, etc / "sources.list")
    else:
        (etc / "sources.list").write_text("")
    for s in sources:
        shutil.copy(s, parts / s.name)
    debian = [p for p in parts.glob("*.sources") if "deb.debian.org" in p.read_text()]
    assert debian or "debian" in (etc / "sources.list").read_text(), "this machine has no Debian apt sources"
    (parts / "gce-backports.sources").write_text(BACKPORTS)
    # As system.sh runs it: Debian's python3 with the repository on its path, before any environment exists.
    r = subprocess.run(
        [
            "python3",
            "-m",
            "building_image_triplet_model.vm.apt_sources",
            str(etc / "sources.list"),
            *map(str, sorted(parts.glob("*.sources"))),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 1, "contrib/non-free were enabled somewhere"
    assert "non-free" in (parts / "gce-backports.sources").read_text()
    return [
        f"-oDir::State={tmp / 'state'}",
        f"-oDir::Cache={tmp / 'cache'}",
        f"-oDir::Etc::SourceList={etc / 'sources.list'}",
        f"-oDir::Etc::SourceParts={parts}",
        f"-oDir::Etc::Preferences={etc / 'preferences'}",
        f"-oDir::Etc::PreferencesParts={etc / 'preferences.d'}",
        "-oDebug::NoLocking=1",
    ]


@pytest.fixture(scope="module")
def apt_opts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A private apt configuration with the VM's sources, updated."""
    opts = private_apt(tmp_path_factory.mktemp("apt"))
    # --error-on=any: a mirror that cannot be reached fails the update instead of warning.
    r = subprocess.run(
        ["apt-get", *opts, "-q", "--error-on=any", "update"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"apt-get update failed (no mirror?):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return opts


@pytest.fixture(scope="module")
def candidate(apt_opts: list[str]) -> str:
    """The version apt would install on the VM for the driver package."""
    opts = apt_opts
    pkg = driver_package()
    r = subprocess.run(["apt-cache", *opts, "policy", pkg], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^\s*Candidate:\s*(\S+)", r.stdout, re.M)
    assert m, f"apt-cache policy {pkg}:\n{r.stdout}"
    assert m.group(1) != "(none)", f"apt knows no {pkg} with these components:\n{r.stdout}"
    print(f"{pkg} candidate: {m.group(1)}")
    return m.group(1)


def test_debian_driver_runs_the_locked_torch(candidate: str) -> None:
    cuda = gpu_stack.lock_cuda_of(REPO / "uv.lock")
    assert gpu_stack.driver_supports(candidate, cuda), gpu_stack.explain(candidate, cuda)


def test_the_same_check_fails_for_the_pre_fix_lock(candidate: str, tmp_path: Path) -> None:
    old = subprocess.run(
        ["git", "show", f"{PRE_FIX_COMMIT}:uv.lock"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert old.returncode == 0, old.stderr
    assert re.search(r'^name = "torch"\nversion = "2\.15\.', old.stdout, re.M), "the lock of torch 2.15"
    (tmp_path / "uv.lock").write_text(old.stdout)
    cuda = gpu_stack.lock_cuda_of(tmp_path / "uv.lock")
    assert cuda[0] == 13
    assert not gpu_stack.driver_supports(candidate, cuda)
    assert "is too old for the locked torch's CUDA 13." in gpu_stack.explain(candidate, cuda)


@pytest.mark.parametrize(
    ("driver", "cuda", "ok"),
    [
        ("535.309.01-0+deb12u1", (12, 8), True),
        ("535.216.03-2~bpo12+1", (12, 2), True),
        ("525.60.13", (12, 0), True),
        ("525.60.12", (12, 0), False),
        ("535.309.01", (13, 0), False),
        ("580.82.07", (13, 2), True),
        ("1:580.65.06-1", (13, 0), True),
    ],
)
def test_driver_versions_compare_numerically(driver: str, cuda: tuple[int, int], ok: bool) -> None:
    assert gpu_stack.driver_supports(driver, cuda) is ok


def simulated_install(opts: list[str], packages: list[str]) -> list[str]:
    """What ``apt-get install --no-install-recommends`` would unpack (on this machine's dpkg state)."""
    r = subprocess.run(
        ["apt-get", *opts, "-s", "install", "--no-install-recommends", *packages],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return re.findall(r"^Inst (\S+)", r.stdout, re.M)


def test_the_headless_set_brings_libcuda_and_no_x_server_where_nvidia_driver_did_not(
    apt_opts: list[str],
) -> None:
    new = simulated_install(apt_opts, driver_packages())
    old = simulated_install(apt_opts, PRE_FIX_PACKAGES)
    assert "libcuda1" in new and "libnvidia-ptxjitcompiler1" in new and "nvidia-kernel-dkms" in new
    assert not [p for p in new if p.startswith("xserver-")], new
    # The set before: the X server's driver in, libcuda1 (only a Recommends of nvidia-driver) out.
    assert "libcuda1" not in old and "xserver-xorg-video-nvidia" in old


def test_headers_for_the_running_kernel_or_the_current_cloud_kernel(
    apt_opts: list[str], tmp_path: Path
) -> None:
    """system.sh's own apt_has and kernel_flavour decide between the running kernel's headers and the
    fallback (the current cloud kernel, then one reboot), against the real archive."""
    conf = tmp_path / "apt.conf"
    conf.write_text("".join(f'{o[2:].split("=", 1)[0]} "{o.split("=", 1)[1]}";\n' for o in apt_opts))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "APT_CONFIG": str(conf)}
    body = 'for p in "$@"; do if apt_has "$p"; then echo "$p yes"; else echo "$p no"; fi; done'
    r = system_sh(
        f"set -- linux-headers-cloud-amd64 linux-image-cloud-amd64 linux-headers-6.1.0-9-cloud-amd64 "
        f"nvidia-kernel-dkms no-such-package; {body}",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:-1] == [
        "linux-headers-cloud-amd64 yes",
        "linux-image-cloud-amd64 yes",
        "linux-headers-6.1.0-9-cloud-amd64 no",  # an ABI the archive no longer keeps
        "nvidia-kernel-dkms yes",
        "no-such-package no",
    ]
    releases = ["6.1.0-28-cloud-amd64", "6.12.9+deb12-cloud-amd64", "6.1.0-57-amd64", "6.18.44-fc-v1300"]
    r = system_sh(f"for k in {' '.join(releases)}; do kernel_flavour $k; done")
    assert r.stdout.split() == ["cloud-amd64", "cloud-amd64", "amd64", "cloud-amd64"], r.stderr
