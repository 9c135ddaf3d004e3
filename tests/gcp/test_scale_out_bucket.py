"""Two scale-out runs share one Cloud Storage bucket (the emulator) without touching each other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import REPO, tiny_config

pytestmark = pytest.mark.slow


def processor(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "building_image_triplet_model.dataset_processor", "--config", str(cfg), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )


def test_two_run_ids_in_one_bucket_never_touch_each_other(archives, gcs_emulator, bucket, tmp_path):
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(
        "".join(f"file://{p}\n\tout=dataset_unaligned/{p.name}\n" for p in sorted(archives[0].glob("*.tar")))
    )
    runs = {"run-a": {}, "run-b": {"image_size": 48, "knn_k": 3}}
    snapshots = {}
    for run_id, overrides in runs.items():
        uri = f"gs://{bucket}/checkpoints/{run_id}"
        worker = tiny_config(tmp_path / run_id / "vm", archives[0], manifest=str(manifest), **overrides)
        out = processor(worker, "--run-uri", uri, "--task-index", "0", "--task-count", "1")
        assert out.returncode == 0, out.stderr[-3000:]
        merge = tiny_config(
            tmp_path / run_id / "merge", tmp_path / "none", manifest=str(manifest), **overrides
        )
        out = processor(merge, "--merge", "--run-uri", uri)
        assert out.returncode == 0, out.stderr[-3000:]
        snapshots[run_id] = {
            name: (blob.generation, blob.md5_hash)
            for name, blob in gcs_emulator.objects(bucket, f"checkpoints/{run_id}/").items()
        }
        assert f"checkpoints/{run_id}/run_settings.json" in snapshots[run_id]
        assert any(n.endswith("emb/0004/_SUCCESS.json") for n in snapshots[run_id])
    everything = gcs_emulator.objects(bucket)
    assert set(everything) == set(snapshots["run-a"]) | set(snapshots["run-b"])  # nothing outside the runs
    run_a_now = {
        n: (b.generation, b.md5_hash) for n, b in gcs_emulator.objects(bucket, "checkpoints/run-a/").items()
    }
    assert run_a_now == snapshots["run-a"]  # run-b wrote nothing into run-a, not even the same bytes again


def test_metadata_cache_is_uploaded_to_a_bucket(archives, gcs_emulator, bucket, tmp_path):
    """METADATA_CACHE_SYNC_URI=gs://...: the finished cache reaches the bucket, byte for byte."""
    cfg = tiny_config(tmp_path, archives[0])
    env = {**os.environ, "METADATA_CACHE_SYNC_URI": f"gs://{bucket}/caches/"}
    # TERM at the first KNN chunk: the index (and the cache upload) are done, no model is loaded.
    env["TRIPLET_FAILPOINT"] = "knn.chunk@1:TERM"
    out = subprocess.run(
        [sys.executable, "-m", "building_image_triplet_model.dataset_processor", "--config", str(cfg)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, start_new_session=True,
    )  # fmt: skip
    assert out.returncode == 75, out.stderr[-3000:]
    blob = gcs_emulator.objects(bucket, "caches/")["caches/metadata_cache_complete.npz"]
    local = tmp_path / "out" / "dataset.work" / "metadata_cache_complete.npz"
    assert blob.download_as_bytes() == local.read_bytes()
