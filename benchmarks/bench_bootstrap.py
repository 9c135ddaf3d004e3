"""Benchmark: what the bootstrap (gcp/scripts/startup_preprocess.sh) costs on a recreated VM, every step that
can be measured on this machine, each figure labelled measured or estimated.

Measured (this machine's network: Debian's mirror and PyPI):

* apt, with a private apt configuration (lists, caches, sources under build/bench: the machine's apt state
  and packages are not changed; dpkg's database is only read): ``apt-get update`` from empty lists; the
  second update after non-free is enabled (``python3 -m building_image_triplet_model.vm.apt_sources`` on a
  copy of the sources, as system.sh does); ``apt-get install --download-only --reinstall
  --no-install-recommends`` into an empty private cache of the base packages (system.sh: ca-certificates
  aria2 git curl python3-venv python3-dev gcc) and of the driver (system.sh's NVIDIA_DRIVER_PACKAGES +
  linux-headers-cloud-amd64): bytes and seconds; unpacking those .deb files (dpkg-deb -x into a scratch
  folder: a lower bound of installing them);
* uv: installing uv with pip into a fresh venv (system.sh install_uv, from PyPI); ``uv sync --frozen`` of
  this project into a fresh environment (UV_PROJECT_ENVIRONMENT) from an EMPTY uv cache (UV_CACHE_DIR,
  once per run: ~3 GB from PyPI), from the WARM cache it left (with the project's bytecode setting, and
  without bytecode to show its share), and again on the synced environment (what a VM whose environment
  is on the work disk does);
* ``import torch, timm`` in a fresh interpreter of that environment, page cache warm and cold (every
  file of the environment and of Python's standard library dropped from the page cache first);
* the model: preflight.resolve + backbone.load from a local safetensors file (random weights saved first)
  for vit_base_patch14_dinov2.lvd142m at 518 (creation and loading only: no forward on this CPU) and for
  the CPU model (resnet18 at 224), weights file evicted first; for the CPU model its first and second batch.

Estimated (cannot run here, each says why): the VM's boot, the disks, the repository fetch, dpkg's
configure step and the DKMS build of the NVIDIA module, the reboot, the hub download of the weights, the
GPU's CUDA start and first batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from common import REPO, Bench, child_python, evict, median, package_version, stat

SYSTEM_SH = REPO / "gcp" / "scripts" / "system.sh"
# system.sh missing_base_packages on GCE's image (curl is there; ca-certificates is named with them)
BASE_PACKAGES = ["ca-certificates", "aria2", "git", "curl", "python3-venv", "python3-dev", "gcc"]
HEADERS = ["linux-headers-cloud-amd64"]  # system.sh also names linux-headers-$(uname -r): the same on the VM
MODELS = {"dinov2_518": ("vit_base_patch14_dinov2.lvd142m", 518), "cpu_model_224": ("resnet18", 224)}


def driver_packages() -> list[str]:
    m = re.search(r"^NVIDIA_DRIVER_PACKAGES=\(([^)]*)\)", SYSTEM_SH.read_text(), re.M)
    if not m:
        raise RuntimeError(f"{SYSTEM_SH}: no NVIDIA_DRIVER_PACKAGES=(...) line")
    return m.group(1).split()


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:6])}... exited {out.returncode}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    return time.monotonic() - t0


def du(path: Path) -> int:
    total = 0
    seen: set[int] = set()
    for p in path.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and not p.is_symlink() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_size
    return total


# -------------------------------------------------------------------------------------------------- apt
class PrivateApt:
    """apt-get with its own lists, caches and sources (copies of this machine's) under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc = root / "etc"
        self.etc.mkdir(parents=True, exist_ok=True)
        parts = self.etc / "sources.list.d"
        if not parts.exists():
            parts.mkdir()
            src = Path("/etc/apt/sources.list")
            (self.etc / "sources.list").write_text(src.read_text() if src.is_file() else "")
            for p in Path("/etc/apt/sources.list.d").glob("*"):
                if p.suffix in (".list", ".sources"):
                    shutil.copy(p, parts / p.name)

    def enable_non_free(self) -> None:
        files = [str(self.etc / "sources.list"), *map(str, sorted((self.etc / "sources.list.d").glob("*")))]
        subprocess.run(
            [sys.executable, "-m", "building_image_triplet_model.vm.apt_sources", *files],
            cwd=REPO,
            capture_output=True,
            check=True,
        )

    def options(self, state: Path, cache: Path) -> list[str]:
        for d in (state / "lists" / "partial", cache / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        return [
            "-o", f"Dir::State={state}",
            "-o", f"Dir::Cache={cache}",
            "-o", f"Dir::Etc::SourceList={self.etc / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={self.etc / 'sources.list.d'}",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=true",
        ]  # fmt: skip

    def get(self, state: Path, cache: Path, *args: str) -> float:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        return run(["apt-get", *self.options(state, cache), "-q", *args], env=env)

    def query(self, state: Path, cache: Path, *args: str) -> str:
        return subprocess.run(
            ["apt-cache", *self.options(state, cache), *args], capture_output=True, text=True, check=False
        ).stdout


def debs(cache: Path) -> list[Path]:
    return sorted((cache / "archives").glob("*.deb"))


def depends_closure(apt: PrivateApt, state: Path, cache: Path, pkgs: list[str]) -> set[str]:
    out = apt.query(
        state, cache, "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
        "--no-breaks", "--no-replaces", "--no-enhances", *pkgs,
    )  # fmt: skip
    return {ln.strip() for ln in out.splitlines() if ln and not ln.startswith((" ", "<"))}


def installed_here() -> dict[str, str]:
    """Installed packages of this machine and their priority."""
    q = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev} ${Priority}\n"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {
        p[0]: p[2] for p in (ln.split() for ln in q.splitlines()) if len(p) >= 3 and p[1].startswith("ii")
    }


def closure_installed_here(
    apt: PrivateApt, state: Path, cache: Path, pkgs: list[str], baseline: set[str], downloaded: list[str]
) -> dict[str, Any]:
    """Packages the named ones depend on (recursively) that this machine already has, so that apt did not
    download them, less every Debian system's base (the required and important packages and everything they
    depend on): what a minimal image may lack besides what apt downloaded here. An estimate."""
    names = depends_closure(apt, state, cache, pkgs)
    got = {d.split("_", 1)[0] for d in downloaded}  # name_version_arch.deb
    extra = sorted((names & installed_here().keys()) - baseline - got)
    sizes: dict[str, int] = {}
    if extra:
        name = None
        for line in apt.query(state, cache, "show", "--no-all-versions", *extra).splitlines():
            if line.startswith("Package: "):
                name = line.split(": ", 1)[1]
            elif line.startswith("Size: ") and name:
                sizes[name] = int(line.split(": ", 1)[1])
    return {"packages": extra, "bytes": sum(sizes.values()), "closure_size": len(names)}


def apt_part(bench: Bench) -> dict[str, Any]:
    root = bench.scratch / "apt"
    shutil.rmtree(root, ignore_errors=True)
    apt = PrivateApt(root / "default")
    nonfree = PrivateApt(root / "nonfree")
    nonfree.enable_non_free()
    f = bench.figures
    update, update2, base_s, base_b, drv_s, drv_b, unpack = [], [], [], [], [], [], []
    base_list: list[str] = []
    drv_list: list[str] = []
    packages = driver_packages() + HEADERS
    for r in range(bench.repeats):
        state, cache = root / f"state{r}", root / f"cache{r}"
        update.append(apt.get(state, cache, "update"))
        base_s.append(
            apt.get(
                state,
                cache,
                "install",
                "-y",
                "--download-only",
                "--reinstall",
                "--no-install-recommends",
                *BASE_PACKAGES,
            )
        )
        base_list = [p.name for p in debs(cache)]
        base_b.append(sum(p.stat().st_size for p in debs(cache)))
        shutil.rmtree(cache)
        update2.append(nonfree.get(state, cache, "update"))  # lists warm from the first update, as on the VM
        drv_s.append(
            nonfree.get(
                state,
                cache,
                "install",
                "-y",
                "--download-only",
                "--reinstall",
                "--no-install-recommends",
                *packages,
            )
        )
        drv_list = [p.name for p in debs(cache)]
        drv_b.append(sum(p.stat().st_size for p in debs(cache)))
        target = root / "unpacked"
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.monotonic()
        for deb in debs(cache):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        unpack.append(time.monotonic() - t0)
        shutil.rmtree(target, ignore_errors=True)
        if r < bench.repeats - 1:
            shutil.rmtree(state)
            shutil.rmtree(cache)
        bench.log(
            f"apt repeat {r + 1}: update {update[-1]:.1f} s, base {base_b[-1] / 1e6:.1f} MB in "
            f"{base_s[-1]:.1f} s, update with non-free {update2[-1]:.1f} s, driver "
            f"{drv_b[-1] / 1e6:.0f} MB in {drv_s[-1]:.1f} s, unpack {unpack[-1]:.1f} s"
        )
    state, cache = root / f"state{bench.repeats - 1}", root / f"cache{bench.repeats - 1}"
    policy = nonfree.query(state, cache, "policy", "nvidia-driver")
    cand = re.search(r"Candidate:\s*(\S+)", policy)
    f["apt_update_empty_lists_s"] = stat(update, "s", 2)
    f["apt_update_after_enabling_non_free_s"] = stat(update2, "s", 2)
    f["apt_base_download_s"] = stat(base_s, "s", 2)
    f["apt_base_download_bytes"] = stat(base_b, "bytes", 0)
    f["apt_driver_download_s"] = stat(drv_s, "s", 2)
    f["apt_driver_download_bytes"] = stat(drv_b, "bytes", 0)
    f["apt_driver_unpack_s"] = stat(unpack, "s", 2)
    f["apt_driver_packages"] = len(drv_list)
    bench.settings["apt"] = {
        "base_packages": BASE_PACKAGES,
        "driver_packages": packages,
        "nvidia_driver_candidate": cand.group(1) if cand else None,
        "base_debs": base_list,
        "driver_debs": drv_list,
    }
    here = installed_here()
    base_system = depends_closure(
        apt, state, cache, [p for p, prio in here.items() if prio in ("required", "important")]
    )
    bench.settings["apt"]["already_installed_here_not_downloaded"] = {
        "base": closure_installed_here(apt, state, cache, BASE_PACKAGES, base_system, base_list),
        "driver": closure_installed_here(nonfree, state, cache, packages, base_system, drv_list),
    }
    extra = bench.settings["apt"]["already_installed_here_not_downloaded"]
    f["apt_driver_download_bytes_plain_image_estimate"] = {
        "estimate": drv_b[-1] + extra["driver"]["bytes"],
        "unit": "bytes",
        "basis": "downloaded here + the closure's packages this machine already has beyond the base system",
    }
    for d in root.glob("cache*"):
        shutil.rmtree(d, ignore_errors=True)
    return bench.settings["apt"]


# --------------------------------------------------------------------------------------------------- uv
def uv_part(bench: Bench) -> Path:
    """Returns a synced environment (for the import figures)."""
    f = bench.figures
    root = bench.scratch / "uv"
    uv = shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv is not on PATH (make setup installs it)")
    uv_version = subprocess.run([uv, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    pinned = re.search(r"^UV_VERSION \?= (\S+)", (REPO / "Makefile").read_text(), re.M)
    pin = pinned.group(1) if pinned else "0.13.9"
    sys_python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

    bench.settings["uv"] = {
        "version": uv_version,
        "pinned": pin,
        "link_mode": os.environ.get("UV_LINK_MODE") or "uv's default",
        "compile_bytecode": "--compile-bytecode (as the VM's uv sync and make setup)",
    }
    if bench.quick:
        # Quick: no fresh environments (a 7.8 GB environment and its bytecode, ~30 s each): the project's
        # own .venv, in sync already (make setup), stands for the environment on the work disk.
        for key in ("uv_install_with_pip_s", "uv_sync_cold_cache_s", "uv_sync_warm_cache_fresh_env_s"):
            bench.not_measured[key] = "quick mode: runs in full mode only"
        venv = REPO / ".venv"
        env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
        noop = [run([uv, "sync", "--frozen", "--no-progress"], env=env, cwd=REPO)]
        f["uv_sync_existing_env_s"] = stat(noop, "s", 2)
        return venv

    pip_s = []
    for _ in range(bench.repeats):
        tool = root / "uv-tool-venv"
        shutil.rmtree(tool, ignore_errors=True)
        t0 = time.monotonic()
        run([sys_python, "-m", "venv", str(tool)])
        pip = [
            str(tool / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--isolated",
            "--no-cache-dir",
            "--quiet",
        ]
        run([*pip, f"uv=={pin}"])
        pip_s.append(time.monotonic() - t0)
    shutil.rmtree(root / "uv-tool-venv", ignore_errors=True)
    f["uv_install_with_pip_s"] = stat(pip_s, "s", 2)

    cache = root / "cache"
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_CACHE_DIR": str(cache), "UV_NO_PROGRESS": "1"}
    sync = [uv, "sync", "--frozen", "--no-progress", "--compile-bytecode"]  # as the VM's step_uv

    def sync_into(venv: Path, *extra: str) -> float:
        return run([*sync, *extra], env={**env, "UV_PROJECT_ENVIRONMENT": str(venv)}, cwd=REPO)

    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(root / "venv-cold", ignore_errors=True)
    cold = sync_into(root / "venv-cold")
    f["uv_sync_cold_cache_s"] = stat([cold], "s (one run: the download is done once per run)", 2)
    f["uv_cache_bytes_after_cold_sync"] = du(cache)
    shutil.rmtree(root / "venv-cold", ignore_errors=True)
    bench.log(f"uv sync, empty cache: {cold:.1f} s, cache {f['uv_cache_bytes_after_cold_sync'] / 1e9:.2f} GB")
    nobc, warm, noop = [], [], []
    for _ in range(bench.repeats):  # where the fresh environment's time goes: the bytecode
        shutil.rmtree(root / "venv-nobc", ignore_errors=True)
        nobc.append(sync_into(root / "venv-nobc", "--no-compile-bytecode"))
    shutil.rmtree(root / "venv-nobc", ignore_errors=True)
    venv = root / "venv"
    for _ in range(bench.repeats):
        shutil.rmtree(venv, ignore_errors=True)
        warm.append(sync_into(venv))
    for _ in range(max(bench.repeats, 5)):
        noop.append(sync_into(venv))
    f["uv_sync_warm_cache_fresh_env_s"] = stat(warm, "s", 2)
    f["uv_sync_warm_cache_fresh_env_no_bytecode_s"] = stat(nobc, "s", 2)
    f["uv_sync_existing_env_s"] = stat(noop, "s", 2)
    f["uv_env_bytes_apparent"] = sum(
        p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink()
    )
    bench.log(
        f"uv: warm {median(warm):.1f} s ({median(nobc):.1f} s without bytecode), "
        f"existing {median(noop):.2f} s"
    )
    return venv


# ----------------------------------------------------------------------------------------------- python
IMPORT = r"""
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import timm
t2 = time.perf_counter()
print(json.dumps({"torch_s": t1 - t0, "timm_s": t2 - t1}))
"""


def import_part(bench: Bench, venv: Path) -> None:
    py = venv / "bin" / "python"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in venv.rglob("*") if p.is_file() and not p.is_symlink()]
    files += [p for p in stdlib.rglob("*") if p.is_file() and not p.is_symlink()]
    f = bench.figures
    for cache in ("warm", "cold"):
        walls, torch_s, timm_s = [], [], []
        n = bench.repeats if cache == "cold" else max(bench.repeats, 5 if not bench.quick else 1)
        for _ in range(n):
            if cache == "cold":
                evict(files)
            elif not walls and not bench.quick:
                subprocess.run(
                    [str(py), "-c", "import torch, timm"], check=True, capture_output=True
                )  # warm up
            t0 = time.monotonic()
            out = subprocess.run([str(py), "-c", IMPORT], capture_output=True, text=True, check=True)
            walls.append(time.monotonic() - t0)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            torch_s.append(res["torch_s"])
            timm_s.append(res["timm_s"])
        f[f"import_torch_timm_{cache}_process_s"] = stat(walls, "s", 2)
        f[f"import_torch_{cache}_s"] = stat(torch_s, "s", 2)
        f[f"import_timm_{cache}_s"] = stat(timm_s, "s", 2)
        bench.log(f"import torch+timm, page cache {cache}: {median(walls):.1f} s")
    bench.settings["import_cold_evicted_files"] = len(files)


# ------------------------------------------------------------------------------------------------ model
SAVE = r"""
import sys, timm, torch
from safetensors.torch import save_file
model = timm.create_model(sys.argv[1], pretrained=False)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
print('{}')
"""

LOAD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, timm
t1 = time.perf_counter()
from building_image_triplet_model import backbone, config, preflight
name, size, weights, out, batches = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
cfg = config.from_mapping({"input_dir": "unused", "hdf5_path": out, "feature_model": name, "image_size": size,
                           "pretrained": True, "weights_path": weights, "device": "cpu", "batch_size": 64})
t2 = time.perf_counter()
resolved = preflight.resolve(cfg)
t3 = time.perf_counter()
bb = backbone.load(cfg, resolved)
t4 = time.perf_counter()
res = {"import_s": t1 - t0, "resolve_s": t3 - t2, "load_s": t4 - t3, "threads": torch.get_num_threads()}
x = torch.randint(0, 255, (64, size, size, 3), dtype=torch.uint8)
with torch.inference_mode():
    for i in range(batches):
        t = time.perf_counter()
        bb.embed(x)
        res[f"batch{i + 1}_s"] = time.perf_counter() - t
print(json.dumps(res))
"""


def model_part(bench: Bench) -> None:
    f = bench.figures
    wdir = bench.scratch.parent / "weights"  # kept between runs: random weights, written once
    wdir.mkdir(parents=True, exist_ok=True)
    for label, (name, size) in MODELS.items():
        weights = wdir / f"{name}.random.safetensors"
        if not weights.exists():
            child_python(SAVE, name, str(weights.with_suffix(".tmp")))
            weights.with_suffix(".tmp").rename(weights)
        rows: dict[str, list[float]] = {}
        batches = 2 if label == "cpu_model_224" else 0
        for _ in range(bench.repeats):
            evict([weights])
            res = child_python(LOAD, name, str(size), str(weights), str(bench.scratch / "m.h5"), str(batches))
            for k, v in res.items():
                rows.setdefault(k, []).append(v)
        for k, v in rows.items():
            if k != "threads":
                f[f"model_{label}_{k}"] = stat(v, "s", 3)
        f[f"model_{label}_weights_bytes"] = weights.stat().st_size
        bench.log(
            f"model {name}@{size}: resolve {median(rows['resolve_s']):.2f} s, "
            f"load {median(rows['load_s']):.2f} s"
        )


# ------------------------------------------------------------------------------------------------- sums
ESTIMATES = {
    "vm_boot_to_startup_script_s": (
        45,
        "GCE boot of a g2 VM until the guest agent runs the startup script; not measurable here",
    ),
    "disks_mount_s": (5, "attach is done by GCE; blkid + mount of two persistent disks; no such disks here"),
    "repo_fetch_s": (10, "git clone/fetch of the repository; the host is not reachable from this machine"),
    "apt_base_install_configure_s": (
        15,
        "dpkg unpack + configure of the base packages; installing would change this machine",
    ),
    "apt_driver_configure_s": (
        60,
        "dpkg configure of the driver packages beyond their unpacking (triggers, initramfs); not run here",
    ),
    "dkms_build_s": (
        240,
        "DKMS build of nvidia-kernel-dkms for the cloud kernel; the DKMS build cannot run here (no headers "
        "for this kernel, and it would change the machine): a rough estimate",
    ),
    "driver_reboot_s": (
        60,
        "system.sh reboots once when the module cannot load at once (nouveau, new kernel); GCE reboot",
    ),
    "hub_weights_download_s": (
        10,
        "346 MB model.safetensors from the Hugging Face hub on first use (then the cache on the work disk); "
        "the hub is not reachable here",
    ),
    "gpu_preflight_s": (10, "CUDA context and a bf16 matmul (vm/gpu_check.py); no GPU here"),
    "gpu_first_batch_s": (
        15,
        "CUDA/cuDNN start and the first batch at 518 px on the L4; no GPU here (benchmarks/gpu.py measures "
        "the steady state)",
    ),
    "system_step_checks_s": (1, "command -v checks and nvidia-smi on a baked image"),
}


def sums(bench: Bench) -> None:
    f = bench.figures

    def m(key: str) -> float:
        v = f.get(key)
        return float(v["median"]) if isinstance(v, dict) and v.get("median") is not None else float("nan")

    fresh_measured = {
        "apt update": m("apt_update_empty_lists_s"),
        "base packages download": m("apt_base_download_s"),
        "uv install with pip": m("uv_install_with_pip_s"),
        "apt update with non-free": m("apt_update_after_enabling_non_free_s"),
        "driver download": m("apt_driver_download_s"),
        "driver unpack (lower bound of install)": m("apt_driver_unpack_s"),
        "uv sync, empty cache": m("uv_sync_cold_cache_s"),
        "import torch, timm (page cache cold)": m("import_torch_timm_cold_process_s"),
        "preflight.resolve + backbone.load, DINOv2 518 (CPU)": m("model_dinov2_518_resolve_s")
        + m("model_dinov2_518_load_s"),
    }
    fresh_estimated = {
        k: ESTIMATES[k][0]
        for k in (
            "vm_boot_to_startup_script_s", "disks_mount_s", "repo_fetch_s", "apt_base_install_configure_s",
            "apt_driver_configure_s", "dkms_build_s", "driver_reboot_s", "hub_weights_download_s",
            "gpu_preflight_s", "gpu_first_batch_s",
        )
    }  # fmt: skip
    baked_measured = {
        "uv sync, environment on the work disk": m("uv_sync_existing_env_s"),
        "import torch, timm (page cache cold)": m("import_torch_timm_cold_process_s"),
        "preflight.resolve + backbone.load, DINOv2 518 (CPU)": m("model_dinov2_518_resolve_s")
        + m("model_dinov2_518_load_s"),
    }
    baked_estimated = {
        k: ESTIMATES[k][0]
        for k in (
            "vm_boot_to_startup_script_s",
            "disks_mount_s",
            "repo_fetch_s",
            "system_step_checks_s",
            "gpu_preflight_s",
            "gpu_first_batch_s",
        )
    }

    def total(measured: dict[str, float], estimated: dict[str, float]) -> dict[str, Any]:
        have = {k: round(v, 2) for k, v in measured.items() if v == v}  # NaN: not measured in this run
        out = {
            "measured_s": round(sum(have.values()), 1),
            "estimated_s": round(sum(estimated.values()), 1),
            "total_s": round(sum(have.values()) + sum(estimated.values()), 1),
            "measured": have,
            "estimated": estimated,
        }
        if len(have) < len(measured):
            out["not_measured_in_this_run"] = sorted(set(measured) - set(have))
        return out

    f["sum_recreated_vm_plain_debian12"] = total(fresh_measured, fresh_estimated)
    f["sum_baked_image_env_and_caches_on_work_disk"] = total(baked_measured, baked_estimated)
    a, b = f["sum_recreated_vm_plain_debian12"], f["sum_baked_image_env_and_caches_on_work_disk"]
    bench.summary.append(
        f"recreated VM, plain debian-12 image: {a['measured_s']:.0f} s measured + {a['estimated_s']:.0f} s "
        f"estimated = ~{a['total_s'] / 60:.1f} min to the first batch"
    )
    bench.summary.append(
        f"baked image + environment and caches on the work disk: {b['measured_s']:.0f} s measured + "
        f"{b['estimated_s']:.0f} s estimated = ~{b['total_s'] / 60:.1f} min"
    )
    bench.not_measured.update({k: f"estimate {v[0]} s: {v[1]}" for k, v in ESTIMATES.items()})


def main() -> None:
    bench = Bench.from_args("bootstrap", repeats=3, quick_repeats=1)
    bench.settings = {
        "torch": package_version("torch"),
        "debian": Path("/etc/debian_version").read_text().strip(),
    }
    if shutil.which("apt-get") and os.geteuid() == 0:
        apt_part(bench)
    else:
        bench.not_measured["apt"] = (
            "needs apt-get and root (the private configuration still downloads as root)"
        )
    venv = uv_part(bench)
    import_part(bench, venv)
    model_part(bench)
    sums(bench)
    bench.notes += [
        "apt figures are relative to this machine's installed packages (dpkg's status is read): packages it "
        "already has are not downloaded; settings.apt.already_installed_here_not_downloaded lists those a "
        "minimal image may lack, with their size (an estimate of what a plain image downloads in addition).",
        "Network: this machine's route to deb.debian.org and PyPI, not the VM's.",
        "The sums add medians of the measured steps and the estimates, separately; the model figures are "
        "on this CPU (the VM loads the same file, then moves the weights to the GPU: part of the GPU "
        "estimate).",
    ]
    bench.write()


if __name__ == "__main__":
    main()
