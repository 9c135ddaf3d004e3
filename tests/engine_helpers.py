"""Helpers for the engine tests: real sample archives, configs for a tiny model, real processes, artifact
readers. Kept out of conftest.py so that test files import them by a name no other test folder uses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from building_image_triplet_model import config
from building_image_triplet_model.io.workdir import Layout
from tools import sample_data

REPO = Path(__file__).resolve().parents[1]

# A timm test model (~370k parameters) at 32 px: real timm code paths, a fraction of a second per batch.
TINY = {
    "feature_model": "test_resnet.r160_in1k",
    "image_size": 32,
    "pretrained": False,
    "device": "cpu",
    "precision": "fp32",
    "batch_size": 8,
    "num_workers": 0,
    "cpu_threads": 1,  # bit-equal results need the same thread count in every process of a comparison
    "knn_k": 5,
    "embedding_chunk_interval_s": 0,
    "knn_chunk_rows": 16,
    "index_workers": 2,
}


def make_archives(out: Path, archives: int = 3, targets: int = 10, bad: bool = True, seed: int = 0) -> dict:
    return sample_data.generate(
        sample_data.Options(out=out, archives=archives, targets_per_archive=targets, seed=seed, bad=bad)
    )


def write_config(path: Path, **data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"data": data}, sort_keys=False))
    return path


def tiny_config(tmp: Path, input_dir: Path, name: str = "cfg.yaml", **overrides: Any) -> Path:
    data = {"input_dir": str(input_dir), "hdf5_path": str(tmp / "out" / "dataset.h5"), **TINY, **overrides}
    return write_config(tmp / name, **data)


def tar_of(path: Path, files: dict[str, bytes], dirs=(), symlinks: dict[str, str] | None = None) -> Path:
    """A GNU tar archive of ``files`` (in their order), with folders and symbolic links where asked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.SYMTYPE
            ti.linkname = target
            tf.addfile(ti)
    return path


def manifest_of(path: Path, archives_dir: Path) -> Path:
    """An aria2c manifest in the upstream shape naming a folder's archives, and a readme as upstream's."""
    lines = []
    for tar_path in sorted(archives_dir.glob("*.tar")):
        lines += [f"file://{tar_path}", f"\tout=dataset_unaligned/{tar_path.name}"]
    lines += ["https://example.invalid/Readme.txt", "\tout=dataset_unaligned/Readme.txt"]
    path.write_text("\n".join(lines) + "\n")
    return path


def load(path: Path) -> tuple[config.DataConfig, Layout]:
    cfg = config.load(path)
    return cfg, Layout(cfg)


def stats(layout: Layout) -> dict[str, Any]:
    return json.loads(layout.stats.read_text())


def run_cli(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run one of the package's modules as a real subprocess (its own process group)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    argv = [sys.executable, "-m", f"building_image_triplet_model.{module}", *args]
    return run_in_group(argv, env=full_env, timeout=timeout)


def run_in_group(
    argv: list[str], *, env: dict[str, str], timeout: float, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """A real process in its own process group (as systemd starts one), its output captured as text."""
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )


def start_processor(cfg_path: Path, failpoint: str | None = None, *extra: str) -> subprocess.Popen:
    """The processor as a real process in its own group (killed with killpg, as systemd or a power cut)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRIPLET_FAILPOINT", None)
    if failpoint:
        env["TRIPLET_FAILPOINT"] = failpoint
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "building_image_triplet_model.dataset_processor",
            "--config",
            str(cfg_path),
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def read_artifact(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file, by name."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
    return out


def assert_same_arrays(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    x, y = read_artifact(a), read_artifact(b)
    assert sorted(x) == sorted(y)
    for name in x:
        if name in skip:
            continue
        assert x[name].dtype == y[name].dtype, name
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
