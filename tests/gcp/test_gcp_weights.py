"""The weights, fetched once: `weights` takes them from the hub (the stand-in of tests/test_hub_weights.py,
which huggingface_hub's own download talks to) into fake-gcs-server once; every worker's config step
downloads them from the bucket, never from the hub, and the model key stays the one the hub's file gives."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from engine_helpers import REPO, tiny_config
from gcp_helpers import Emulator
from test_hub_weights import REPO_ID, HubStandIn, hub_env, weights

from building_image_triplet_model import config as engine_config
from building_image_triplet_model.engine import preflight
from building_image_triplet_model.vm import config_step
from building_image_triplet_model.vm.paths import VMPaths

__all__ = ["weights"]  # the fixture, imported so that pytest finds it here


def hub_gets(hub: HubStandIn) -> list[tuple[str, str]]:
    return [r for r in hub.requests if r[0] == "GET"]


def test_the_weights_are_fetched_once_and_every_worker_reads_the_bucket(
    tmp_path: Path, weights: Path, gcs_emulator: Emulator, bucket: str
) -> None:
    data = weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    hub = HubStandIn({f"{REPO_ID}/model.safetensors": data}).start()
    cfg = tiny_config(tmp_path, tmp_path, pretrained=True)
    to = f"gs://{bucket}/weights"
    env = {**os.environ, **gcs_emulator.env(), **hub_env(tmp_path, hub.endpoint)}
    cmd = [
        sys.executable,
        "-m",
        "building_image_triplet_model.remote.weights",
        "--config",
        str(cfg),
        "--to",
        to,
    ]
    try:
        r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        uri = f"{to}/{REPO_ID}/{digest}/model.safetensors"
        assert f"set data.weights_path: {uri}" in r.stdout
        assert gcs_emulator.objects(bucket)[uri.removeprefix(f"gs://{bucket}/")].download_as_bytes() == data
        fetched = len(hub_gets(hub))
        assert fetched >= 1
        again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "already there" in again.stdout

        # Three workers: each config step takes the weights from the bucket; the hub hears nothing more.
        yaml_text = yaml.safe_dump({"data": {**yaml.safe_load(cfg.read_text())["data"], "weights_path": uri}})
        digests = set()
        for i in range(3):
            work = tmp_path / f"worker{i}"
            paths = VMPaths.from_env(
                {"TRIPLET_MOUNT_WORK": str(work), "TRIPLET_MOUNT_RAW": str(work / "raw")}
            )
            paths.config_dir.mkdir(parents=True)
            eff = paths.config_dir / "preprocess.yaml"
            eff.write_text(
                config_step.effective_yaml(yaml_text, "test", paths, False, tmp_path / "m.txt", True)
            )
            loaded = engine_config.load(eff)
            local = Path(str(loaded.weights_path))
            assert local.is_relative_to(paths.config_dir)
            assert local.read_bytes() == data
            digests.add(preflight.weights_digest(str(local)))
        assert len(hub_gets(hub)) == fetched
    finally:
        hub.stop()
    # The model key names the weights by their SHA-256: the hub's file gives the same (test_hub_weights).
    assert digests == {f"sha256:{digest}"}


def test_a_missing_weights_object_stops_the_config_step(
    tmp_path: Path, gcs_emulator: Emulator, bucket: str
) -> None:
    paths = VMPaths.from_env(
        {"TRIPLET_MOUNT_WORK": str(tmp_path / "w"), "TRIPLET_MOUNT_RAW": str(tmp_path / "r")}
    )
    text = yaml.safe_dump(
        {
            "data": {
                "input_dir": "x",
                "hdf5_path": "o.h5",
                "weights_path": f"gs://{bucket}/w/abc/model.safetensors",
            }
        }
    )
    with pytest.raises(config_step.ConfigStepError, match="does not exist"):
        config_step.effective_yaml(text, "metadata", paths, False, tmp_path / "m.txt", True)
