"""The pristine Debian 12 root itself: built from this machine's mirror, as GCE's debian-12 image is (python3,
curl, systemd; no git, aria2 or venv), and its chroot confined to its own namespaces."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pristine import root as pristine


def test_mirrors_come_from_this_machines_apt_sources(tmp_path: Path) -> None:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text("# deb http://old.example/debian bookworm main\n")
    extra = "deb [arch=amd64] http://m.example/debian/ bookworm main\n"
    (etc / "sources.list.d" / "extra.list").write_text(extra)
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://x.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://x.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    assert pristine.host_mirrors(etc) == ("http://m.example/debian", "http://x.example/debian-security")
    (etc / "sources.list.d" / "extra.list").unlink()
    assert pristine.host_mirrors(etc) == ("http://x.example/debian", "http://x.example/debian-security")
    (etc / "sources.list.d" / "debian.sources").unlink()
    with pytest.raises(pristine.Unavailable, match="name no Debian mirror for bookworm"):
        pristine.host_mirrors(etc)


def test_the_cache_is_keyed_by_the_recipe() -> None:
    r = pristine.recipe()
    assert pristine.tarball_path(r) == pristine.tarball_path(dict(r))
    assert pristine.tarball_path(r) != pristine.tarball_path({**r, "packages": [*r["packages"], "git"]})


@pytest.mark.slow  # ~5 min the first time (debootstrap), then 10-25 s per fresh copy
def test_a_fresh_root_is_gce_debian_12_and_its_chroot_stays_inside(tmp_path: Path) -> None:
    root = pristine.fresh_root_or_skip(tmp_path / "root")
    assert (root / "etc/debian_version").read_text().startswith("12.")
    assert (root / "sbin/init").resolve().name == "systemd"
    for present in ("usr/bin/python3", "usr/bin/curl", "usr/bin/systemctl", "usr/bin/apt-get"):
        assert (root / present).exists(), present
    for absent in ("usr/bin/git", "usr/bin/aria2c"):
        assert not (root / absent).exists(), absent
    sources = (root / "etc/apt/sources.list.d/debian.sources").read_text()
    assert "bookworm-backports" in sources and "non-free" not in sources

    probe = (
        "python3 -c 'import ensurepip' 2>/dev/null && echo venv || echo no-venv; "
        'cat /proc/1/comm; echo $HOME; test -s "$SSL_CERT_FILE" && echo ca; '
        "apt-get -q update >/dev/null && echo apt-ok"
    )
    r = pristine.run_in_root(root, ["bash", "-c", probe], timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["no-venv", "bash", "/root", "ca", "apt-ok"], r.stdout
    # Its own mount namespace: nothing it mounted is left on this machine.
    mounts = Path("/proc/self/mounts").read_text()
    assert str(root) not in mounts
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True, timeout=300)


def test_without_root_it_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    """Not root: Unavailable (a test skips with this reason), before anything is built or extracted."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from pristine import root\n"
        "try:\n    root.fresh_root(Path(sys.argv[2]))\nexcept root.Unavailable as exc:\n    print(exc)"
    )
    tmp_path.chmod(0o777)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run(
        [*nobody, "python3", "-c", code, str(pristine.REPO / "tests"), str(tmp_path / "root")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.strip() == "a pristine Debian root needs root (debootstrap, chroot, mounts)", r.stderr
    assert not (tmp_path / "root").exists()
