"""A pristine Debian 12 root for the tests: what GCE's debian-12 image holds, made with debootstrap from the
Debian mirror this machine's apt uses, so that the bootstrap's package installs can be proven for real.

    root = fresh_root(tmp_path / "root")          # a fresh copy (raises Unavailable: no root, no mirror)
    root = fresh_root_or_skip(tmp_path / "root")  # the same in a test: skips with the reason
    run_in_root(root, ["apt-get", "update"])      # a chroot in its own mount and PID namespace

The root is built once (about 3 minutes) into ``build/pristine/bookworm-<digest>.tar``, keyed by a digest of
the recipe (suite, mirror, package list), under a lock so that two test processes never build at once; each
test extracts its own copy. ``make pristine-root`` builds it ahead. Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "pristine"
SUITE = "bookworm"
ARCH = "amd64"
# What GCE's debian-12 image has beside debootstrap's default (required + important) set: a booting systemd,
# Python, curl and TLS roots, the tools its guest environment uses, and unattended-upgrades (on by default
# there, and the reason the driver is held). Not there, on purpose: git, aria2, python3-venv, the driver.
PACKAGES = (
    "ca-certificates",
    "curl",
    "dbus",
    "iproute2",
    "kmod",
    "procps",
    "python3",
    "systemd",
    "systemd-sysv",
    "udev",
    "unattended-upgrades",
)
# Bumped when the recipe below changes in a way the digest does not see.
RECIPE = 1
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Inside the root: a copy of this machine's CA bundle. This machine intercepts TLS, so pip and uv in the root
# trust PyPI only through it; on GCE the root's own bundle verifies PyPI normally (a stand-in detail).
HOST_CA = "/etc/ssl/host-ca-bundle.crt"
HOST_CA_ENV = {"SSL_CERT_FILE": HOST_CA, "PIP_CERT": HOST_CA, "CURL_CA_BUNDLE": HOST_CA}
# File capabilities (ping) are extended attributes; owners by number, never this machine's names.
TAR_OPTS = ("--numeric-owner", "--xattrs", "--xattrs-include=*")
DEFAULT_ENV = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", **HOST_CA_ENV}


class Unavailable(Exception):
    """No pristine root can be made here (not root, or no Debian mirror reachable): tests skip."""


def _sources_entries(text: str, deb822: bool) -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of each `deb` entry in an apt sources file."""
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                for uri in fields.get("URIs", "").split():
                    yield uri, fields.get("Suites", "").split()
        return
    for line in text.splitlines():
        m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m:
            yield m.group(1), [m.group(2)]


def host_mirrors(etc_apt: Path = Path("/etc/apt")) -> tuple[str, str | None]:
    """(archive mirror, security mirror or None) for Debian 12, read from this machine's apt sources."""
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    files += sorted((etc_apt / "sources.list.d").glob("*.sources"))
    archive = security = None
    for f in files:
        if not f.is_file():
            continue
        for uri, suites in _sources_entries(f.read_text(errors="replace"), f.suffix == ".sources"):
            if archive is None and SUITE in suites:
                archive = uri.rstrip("/")
            if security is None and f"{SUITE}-security" in suites:
                security = uri.rstrip("/")
    if archive is None:
        raise Unavailable(f"this machine's apt sources ({etc_apt}) name no Debian mirror for {SUITE}")
    return archive, security


def recipe() -> dict:
    archive, security = host_mirrors()
    return {
        "suite": SUITE,
        "arch": ARCH,
        "mirror": archive,
        "security": security,
        "packages": sorted(PACKAGES),
        "recipe": RECIPE,
    }


def tarball_path(r: Mapping | None = None) -> Path:
    r = recipe() if r is None else r
    digest = hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:16]
    return CACHE / f"{SUITE}-{digest}.tar"


def _check_root() -> None:
    if os.geteuid() != 0:
        raise Unavailable("a pristine Debian root needs root (debootstrap, chroot, mounts)")


def _check_can_build(mirror: str) -> None:
    _check_root()
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed: run `make sys-deps`")
    url = f"{mirror}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(url, timeout=20) as resp:  # noqa: S310 (the mirror apt itself uses)
            resp.read(1)
    except OSError as exc:
        raise Unavailable(f"debootstrap cannot reach the Debian mirror {url}: {exc}") from exc


def gce_sources(archive: str, security: str | None) -> str:
    """/etc/apt/sources.list.d/debian.sources as GCE's debian-12 image has it (main only, with backports),
    pointing at this machine's mirrors."""
    text = (
        f"Types: deb\nURIs: {archive}\nSuites: {SUITE} {SUITE}-updates {SUITE}-backports\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    if security:
        text += (
            f"\nTypes: deb\nURIs: {security}\nSuites: {SUITE}-security\n"
            "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
    return text


def _build(r: Mapping, tar: Path) -> None:
    work = tar.with_suffix(".building")
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    subprocess.run(
        [
            "debootstrap",
            f"--arch={r['arch']}",
            f"--include={','.join(r['packages'])}",
            r["suite"],
            str(work),
            r["mirror"],
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=1800,
    )
    debootstrap_s = time.monotonic() - started
    (work / "etc/apt/sources.list").unlink(missing_ok=True)
    (work / "etc/apt/sources.list.d/debian.sources").write_text(gce_sources(r["mirror"], r["security"]))
    for deb in (work / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (work / "etc/hostname").write_text("pristine-debian-12\n")
    partial = tar.with_suffix(".tar.partial")
    subprocess.run(
        ["tar", *TAR_OPTS, "-cf", str(partial), "-C", str(work), "."],
        check=True,
        timeout=600,
    )
    os.replace(partial, tar)
    shutil.rmtree(work, ignore_errors=True)
    timing = {"debootstrap_s": round(debootstrap_s, 1), "total_s": round(time.monotonic() - started, 1)}
    tar.with_suffix(".json").write_text(json.dumps({**r, **timing}, indent=1) + "\n")


def cached_tarball() -> Path:
    """The pristine root's tarball, built once (under a lock) if this recipe has none yet."""
    r = recipe()
    tar = tarball_path(r)
    if tar.is_file():
        return tar
    _check_can_build(r["mirror"])
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building it: wait, then reuse
        if not tar.is_file():
            _build(r, tar)
    return tar


def install_host_ca(root: Path) -> None:
    """Copy this machine's CA bundle to HOST_CA inside the root (see HOST_CA_ENV)."""
    dest = root / HOST_CA.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", dest)


def fresh_root(dest: Path) -> Path:
    """A fresh copy of the pristine root at ``dest`` (created; must not exist or be empty), with this
    machine's resolv.conf and CA bundle copied in."""
    _check_root()
    tar = cached_tarball()
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", *TAR_OPTS, "-xpf", str(tar), "-C", str(dest)],
        check=True,
        timeout=600,
    )
    resolv = dest / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    install_host_ca(dest)
    return dest


def fresh_root_or_skip(dest: Path) -> Path:
    """fresh_root() for a test: skips it, with the reason, where no pristine root can be made."""
    import pytest

    try:
        return fresh_root(dest)
    except Unavailable as exc:
        pytest.skip(str(exc))


def chroot_argv(root: Path, argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The command line that runs ``argv`` chrooted in ``root``: in its own mount and PID namespaces (nothing
    mounted leaks to this machine; every process dies with it), with a fresh /proc and this machine's /sys
    and /dev bound, and only ``env`` (DEFAULT_ENV if None) as environment."""
    env = DEFAULT_ENV if env is None else env
    setup = (
        'set -e; r="$1"; shift; '
        'mount --rbind /sys "$r/sys"; mount --make-rslave "$r/sys"; '
        'mount --rbind /dev "$r/dev"; mount --make-rslave "$r/dev"; '
        'exec chroot "$r" "$@"'
    )
    return [
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        f"--mount-proc={root / 'proc'}",
        "bash",
        "-c",
        setup,
        "-",
        str(root),
        "/usr/bin/env",
        "-i",
        *(f"{k}={v}" for k, v in env.items()),
        *argv,
    ]


def run_in_root(
    root: Path,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 900,
    check: bool = False,
    **kwargs,
) -> subprocess.CompletedProcess:
    """Run ``argv`` in a chroot of ``root`` (see chroot_argv); output captured as text unless told."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(chroot_argv(root, argv, env), timeout=timeout, check=check, **kwargs)


@contextlib.contextmanager
def timed() -> Iterator[dict]:
    """with timed() as t: ... ; t["s"] is the seconds it took (for figures, never for asserts)."""
    t: dict = {}
    start = time.monotonic()
    try:
        yield t
    finally:
        t["s"] = round(time.monotonic() - start, 1)


def main() -> int:
    """`python tests/pristine/root.py`: build (or find) the cache; print its path."""
    try:
        print(cached_tarball())
    except Unavailable as exc:
        print(f"pristine root unavailable: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
