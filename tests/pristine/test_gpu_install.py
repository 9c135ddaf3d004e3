"""The GPU stack, installed for real: the bootstrap's own functions (system.sh's ``enable_nonfree`` and
``install_driver_set``, with its one NVIDIA_DRIVER_PACKAGES) install Debian 12's driver into a pristine
Debian 12 root with real apt against this machine's Debian mirror. Asking apt for a candidate is not
installing: this test installs, then looks at what dpkg put on the disk.

The kernel module's DKMS build against the cloud kernel's headers is `make gpu-stack-check`
(tests/pristine/gpu_stack_check.py; result in docs/gpu_stack_check.json): too long for CI.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from building_image_triplet_model.vm import gpu_stack
from pristine import root as pristine
from pristine.bootstrap import REPO, installed, run_system_sh, system_sh_array


@pytest.mark.slow  # 1-3.5 min on 2 shared cores (fresh root, apt, 58 packages); +5 min for the root once
def test_the_bootstraps_driver_set_installs_libcuda_without_xorg_and_holds_it(tmp_path: Path) -> None:
    root = pristine.fresh_root_or_skip(tmp_path / "root")
    packages = system_sh_array("NVIDIA_DRIVER_PACKAGES")
    before = installed(root)
    assert "libcuda1" not in before and "python3" in before

    # What the system step would install beside the driver on GCE's image: Python.h (python3-dev) and gcc
    # among them, for compile: true.
    r = run_system_sh(root, "missing_base_packages", timeout=120)
    assert r.stdout.split() == ["aria2", "git", "python3-venv", "python3-dev", "gcc"], r.stderr

    r = run_system_sh(root, "enable_nonfree; install_driver_set", DEBIAN_FRONTEND="noninteractive")
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    after = installed(root)

    for pkg in packages:
        assert pkg in after, f"{pkg} of NVIDIA_DRIVER_PACKAGES is not installed"
    # libcuda.so.1, what torch dlopens, is on the disk and in the linker's cache.
    files = pristine.run_in_root(root, ["dpkg", "-L", "libcuda1"], timeout=60).stdout.split()
    libcuda = [f for f in files if f.endswith("/libcuda.so.1")]
    assert libcuda and (root / libcuda[0].lstrip("/")).exists(), files
    cache = pristine.run_in_root(root, ["ldconfig", "-p"], timeout=60).stdout
    assert re.search(r"^\s*libcuda\.so\.1 \(libc6,x86-64\) => /", cache, re.M), cache
    assert re.search(r"^\s*libnvidia-ml\.so\.1 ", cache, re.M), "NVML (nvidia-smi, torch's device count)"
    # Headless: no X server came with it.
    xorg = sorted(p for p in after if p.startswith(("xserver-", "xorg", "libgl1", "libx11-")))
    assert not xorg, f"X.org pieces installed: {xorg}"
    # The driver is one that runs the locked torch.
    assert gpu_stack.driver_supports(after["libcuda1"], gpu_stack.lock_cuda_of(REPO / "uv.lock")), after[
        "libcuda1"
    ]
    # Held: unattended upgrades cannot swap the libraries under a running job.
    held = set(pristine.run_in_root(root, ["apt-mark", "showhold"], timeout=60).stdout.split())
    for pkg in [*packages, "libnvidia-ptxjitcompiler1", "firmware-nvidia-gsp", "nvidia-kernel-support"]:
        assert pkg in held, f"{pkg} is not held: {sorted(held)}"
    assert not held - set(after), "only installed packages are held"
    added = sorted(set(after) - set(before))
    print(f"{len(added)} packages added: {' '.join(added)}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True, timeout=300)
