"""The VM's preflight (``startup_preprocess.sh ... preflight``) with the locked torch on this GPU-less
machine: a YAML that asks for CUDA stops the startup before the job with exit 6 and one recorded message
naming the driver and torch's CUDA version; the CPU passes after one real forward pass of the configured
model at the configured size, and a forward pass that fails stops the startup; a failure is not retried in a
loop."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import REPO, TINY, write_config
from gcp_helpers import marker, run_script, script_env

from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.vm import gpu_stack
from building_image_triplet_model.vm.gpu_check import nvidia_present

pytestmark = pytest.mark.skipif(nvidia_present(), reason="an NVIDIA GPU is here: CUDA would pass the check")


def preflight_env(tmp: Path, device: str, **overrides: Any) -> dict[str, str]:
    data = {**TINY, "device": device, **overrides}
    cfg = write_config(tmp / "preprocess.yaml", input_dir="x", hdf5_path="out/dataset.h5", **data)
    return script_env(
        tmp,
        TRIPLET_RUN_ID="preflight",
        TRIPLET_MANIFEST_URI="data/downloads/raw_archives_sample.txt",
        TRIPLET_PREPROCESS_CONFIG_FILE=str(cfg),
        TRIPLET_PROCESSOR_MODULE="no_such_engine_module",  # a job that started would fail loudly
    )


def preflight(tmp: Path) -> dict[str, Any]:
    return marker(tmp / "work", "preflight")


def test_cuda_without_a_driver_stops_the_startup_with_one_message(tmp_path: Path) -> None:
    env = preflight_env(tmp_path, "cuda")
    start = time.monotonic()
    r = run_script("startup_preprocess.sh", "config", "preflight", env=env)
    assert r.returncode == Exit.MODEL == 6, r.stderr[-3000:]
    m = preflight(tmp_path)
    lock = gpu_stack.lock_cuda_of(REPO / "uv.lock")
    assert (m["status"], m["checks"], m["driver"]) == ("failed", 1, "none found")
    assert m["lock_cuda"] == f"{lock[0]}.{lock[1]}"
    assert "NVIDIA driver none found" in m["message"]
    assert f"built for CUDA {lock[0]}.{lock[1]}" in m["message"]
    assert "no NVIDIA driver is loaded" in m["message"]
    assert r.stderr.count("preflight: the GPU cannot be used:") == 1
    assert "preflight: the GPU cannot be used (state/preflight.json)" in r.stderr

    # The whole startup (every step): stops at the preflight, so the job never starts; a second boot checks
    # once more and stops the same way (nothing loops).
    r = run_script("startup_preprocess.sh", env=env)
    assert r.returncode == 6, r.stderr[-3000:]
    assert r.stderr.count("preflight: the GPU cannot be used:") == 1
    assert "start:" not in r.stderr
    assert preflight(tmp_path)["checks"] == 2
    assert not (tmp_path / "work" / "state" / "download.json").exists()
    assert not (tmp_path / "run" / "job.pid").exists()
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    assert time.monotonic() - start < 120


def test_cpu_passes_and_replaces_an_earlier_failure(tmp_path: Path) -> None:
    (tmp_path / "work" / "state").mkdir(parents=True)
    (tmp_path / "work" / "state" / "preflight.json").write_text(
        json.dumps({"status": "failed", "checks": 3, "message": "an earlier boot's failure"})
    )
    r = run_script("startup_preprocess.sh", "config", "preflight", env=preflight_env(tmp_path, "cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = preflight(tmp_path)
    assert (m["status"], m["device"], m["checks"]) == ("done", "cpu", 4)
    assert "message" not in m
    # One real forward pass of the configured model, at its size, precision and batch size.
    forward = {k: v for k, v in m["forward"].items() if k != "seconds"}
    assert forward == {
        "model": TINY["feature_model"],
        "input": f"{TINY['image_size']}x{TINY['image_size']}",
        "precision": "fp32",
        "batch": TINY["batch_size"],
        "compile": False,
    }
    assert f"one forward pass of {TINY['batch_size']} images at 32x32 in fp32 on cpu ran" in r.stderr


def test_a_forward_pass_that_fails_stops_the_startup_naming_the_model_and_size(tmp_path: Path) -> None:
    """A ViT at a size its patches do not divide: the model is created (the size is only resampled), and
    only its forward pass fails, as a missing kernel on the GPU would."""
    env = preflight_env(tmp_path, "cpu", feature_model="test_vit.r160_in1k", image_size=40)
    r = run_script("startup_preprocess.sh", "config", "preflight", env=env)
    assert r.returncode == Exit.MODEL, r.stderr[-3000:]
    m = preflight(tmp_path)
    assert (m["status"], m["checks"]) == ("failed", 1)
    assert m["message"].startswith(
        "test_vit.r160_in1k: one forward pass of 8 images at 40x40 in fp32 on cpu failed: "
    ), m["message"]
    assert "divisible by patch size" in m["message"]
    assert r.stderr.count("preflight: the model cannot run:") == 1
    assert "Traceback" not in r.stderr
