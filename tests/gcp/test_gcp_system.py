"""The system step repairs a dpkg that a preemption left half-configured, with real dpkg on a private
database: a tiny real package whose postinst fails the first time is left half-configured (``dpkg --audit``
lists it, and apt would refuse to run), then ``startup_preprocess.sh system`` must configure it."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from gcp_helpers import run_script, script_env

PKG = "triplet-dpkg-probe"
UV_VERSION = "0.13.9"  # system.sh's TRIPLET_UV_VERSION: with it on PATH the step installs no uv


def dpkg_opts(root: Path) -> list[str]:
    # Maintainer scripts run without chroot (the private root has no /bin/sh); dpkg sets DPKG_ROOT for them.
    return [
        f"--root={root}",
        f"--admindir={root}/var/lib/dpkg",
        "--force-script-chrootless",
        "--force-not-root",
        f"--log={root}/dpkg.log",
    ]


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dpkg", *dpkg_opts(root), *args], capture_output=True, text=True, timeout=120)


def build_package(tmp: Path) -> Path:
    src = tmp / "pkg"
    (src / "DEBIAN").mkdir(parents=True)
    (src / "usr" / "share" / PKG).mkdir(parents=True)
    (src / "usr" / "share" / PKG / "README").write_text("left half-configured on purpose\n")
    (src / "DEBIAN" / "control").write_text(
        f"Package: {PKG}\nVersion: 1.0\nArchitecture: all\nMaintainer: tests <tests@example.com>\n"
        "Description: fails its first configure, as an apt run cut by a preemption would\n"
    )
    postinst = src / "DEBIAN" / "postinst"
    postinst.write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            set -e
            flag="${DPKG_ROOT:-}/var/lib/triplet-dpkg-probe.first-configure"
            if [ ! -e "$flag" ]; then
                : > "$flag"
                echo "postinst: the first configure fails on purpose" >&2
                exit 1
            fi
            echo configured > "${DPKG_ROOT:-}/var/lib/triplet-dpkg-probe.configured"
            """
        )
    )
    postinst.chmod(0o755)
    deb = tmp / f"{PKG}_1.0_all.deb"
    r = subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(src), str(deb)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return deb


def status(root: Path) -> str:
    r = subprocess.run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Status}", PKG],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def pinned_uv() -> str | None:
    uv = shutil.which("uv")
    if uv is None:
        return None
    r = subprocess.run([uv, "--version"], capture_output=True, text=True, timeout=60)
    return uv if r.returncode == 0 and f" {UV_VERSION}" in r.stdout else None


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed (not a Debian machine)")
def test_the_system_step_repairs_a_half_configured_dpkg(tmp_path: Path) -> None:
    uv = pinned_uv()
    if uv is None:
        pytest.skip(f"no uv {UV_VERSION} on PATH (make setup installs it): the step would install one")
    missing = [t for t in ("aria2c", "git", "curl") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' '.join(missing)} not installed (make sys-deps): the step would apt-get them")
    root = tmp_path / "root"
    admin = root / "var" / "lib" / "dpkg"
    for d in ("info", "updates", "triggers"):
        (admin / d).mkdir(parents=True)
    (admin / "status").touch()
    (admin / "available").touch()
    deb = build_package(tmp_path)

    r = dpkg(root, "--install", str(deb))
    assert r.returncode != 0, "the first configure must fail"
    assert "the first configure fails on purpose" in r.stderr
    assert status(root) == "install ok half-configured"
    assert PKG in dpkg(root, "--audit").stdout

    # Anything the step would install goes through apt-get: here that would be a bug, not a repair.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/apt-get-calls\nexit 1\n')
    (bin_dir / "apt-get").chmod(0o755)
    env = script_env(
        tmp_path,
        TRIPLET_SKIP_SYSTEM="0",
        TRIPLET_GPU_DRIVER="skip",
        TRIPLET_UV=uv,
        TRIPLET_DPKG_OPTS=" ".join(dpkg_opts(root)),
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    r = run_script("startup_preprocess.sh", "system", env=env)
    assert r.returncode == 0, r.stderr
    assert "system: dpkg was interrupted (a preemption during apt?); repairing with dpkg --configure -a" in (
        r.stderr
    )
    assert "system: NVIDIA driver skipped (gpu-driver=skip)" in r.stderr
    assert not (tmp_path / "apt-get-calls").exists(), "nothing was installed"
    assert dpkg(root, "--audit").stdout == ""
    assert status(root) == "install ok installed"
    assert (root / "var" / "lib" / "triplet-dpkg-probe.configured").read_text() == "configured\n"

    # A healthy dpkg: nothing to repair, nothing said about it.
    r = run_script("startup_preprocess.sh", "system", env=env)
    assert r.returncode == 0, r.stderr
    assert "dpkg was interrupted" not in r.stderr


def test_a_bake_leaves_nothing_of_its_own_vm_on_the_disk_that_becomes_the_image(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "systemctl"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/calls\n')
        (bin_dir / tool).chmod(0o755)
    state = tmp_path / "var-lib-triplet"
    state.mkdir()
    (state / "driver-reboot-done").write_text("2026-12-01T00:00:00Z\n")  # the builder rebooted once
    env = script_env(
        tmp_path,
        TRIPLET_BAKE="true",
        TRIPLET_SYSTEM_STATE_DIR=str(state),
        TRIPLET_SYSTEMCTL=str(bin_dir / "systemctl"),
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "steps: system bake" in r.stderr
    assert (tmp_path / "calls").read_text().splitlines() == ["apt-get clean", "systemctl poweroff"]
    assert not (state / "driver-reboot-done").exists(), "a VM from the image must get its own reboot"
    work = tmp_path / "work"
    assert not work.exists() or not any(work.rglob("*")), "no log file is baked into the image"


def install_nvidia(tmp: Path, scenario: str) -> subprocess.CompletedProcess[str]:
    """system.sh's install_nvidia on a machine with an NVIDIA device (the PCI probe answers yes) where the
    driver does not load, with ``scenario`` standing in for what apt did (the real installs are
    tests/pristine/test_gpu_install.py and `make gpu-stack-check`); systemctl records what it was asked."""
    scripts = Path(__file__).resolve().parents[2] / "gcp" / "scripts"
    body = f"""
        set -Eeuo pipefail
        source {scripts}/lib.sh; source {scripts}/system.sh
        nvidia_present() {{ return 0; }}
        sysvm() {{ echo install; }}
        modprobe() {{ return 1; }}
        nvidia-smi() {{ return 1; }}
        install_gpu_stack() {{ {scenario}; }}
        install_nvidia
        echo "returned"
    """
    env = {
        "PATH": os.environ["PATH"],
        "TRIPLET_SYSTEM_STATE_DIR": str(tmp / "state"),
        "TRIPLET_SYSTEMCTL": str(tmp / "systemctl"),
    }
    (tmp / "systemctl").write_text(f'#!/bin/sh\necho "systemctl $*" >> {tmp}/calls\n')
    (tmp / "systemctl").chmod(0o755)
    return subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=60, env=env)


def test_a_new_kernel_reboots_once_and_a_second_time_is_an_error(tmp_path: Path) -> None:
    """No headers for the running kernel: the current cloud kernel was installed and the module built for it,
    so the VM reboots into it, once; a VM that comes back on the old kernel stops with the reason."""
    r = install_nvidia(tmp_path, "TRIPLET_KERNEL_CHANGED=1")
    assert r.returncode == 0, r.stderr
    assert "returned" not in r.stdout, "the step ends with the reboot"
    assert (tmp_path / "calls").read_text() == "systemctl reboot\n"
    assert "system: the driver was built for the current cloud-amd64 kernel, not the running" in r.stderr
    assert (tmp_path / "state" / "driver-reboot-done").is_file()

    r = install_nvidia(tmp_path, "TRIPLET_KERNEL_CHANGED=1")
    assert r.returncode == 1
    assert (tmp_path / "calls").read_text() == "systemctl reboot\n", "no second reboot"
    assert "Debian keeps no headers for it" in r.stderr and "ERROR: system: still running kernel" in r.stderr


def test_a_module_that_does_not_load_reboots_once_then_names_secure_boot(tmp_path: Path) -> None:
    r = install_nvidia(tmp_path, "TRIPLET_KERNEL_CHANGED=0")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "calls").read_text() == "systemctl reboot\n"
    assert "the driver needs a reboot to load" in r.stderr
    r = install_nvidia(tmp_path, "TRIPLET_KERNEL_CHANGED=0")
    assert r.returncode == 1
    assert "nvidia-smi fails (secure boot on?" in r.stderr
    assert (tmp_path / "calls").read_text() == "systemctl reboot\n"
