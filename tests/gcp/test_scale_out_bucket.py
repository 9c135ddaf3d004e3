"""Two scale-out runs share one Cloud Storage bucket (the emulator) without touching each other."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from engine_helpers import run_cli, tiny_config
from gcp_helpers import write_manifest

pytestmark = pytest.mark.slow


def processor(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli("dataset_processor", "--config", str(cfg), *args, env=env)


def test_two_run_ids_in_one_bucket_never_touch_each_other(archives, gcs_emulator, bucket, tmp_path):
    manifest = write_manifest(
        tmp_path / "manifest.txt",
        [(f"file://{p}", f"dataset_unaligned/{p.name}") for p in sorted(archives[0].glob("*.tar"))],
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
        # The embedding store of an archive is named by the model and the archive's content (scale_out.py).
        assert any(
            re.fullmatch(rf"checkpoints/{run_id}/shards/emb/[^/]+/0004-[^/]+/_SUCCESS\.json", n)
            for n in snapshots[run_id]
        ), sorted(snapshots[run_id])
    everything = gcs_emulator.objects(bucket)
    assert set(everything) == set(snapshots["run-a"]) | set(snapshots["run-b"])  # nothing outside the runs
    run_a_now = {
        n: (b.generation, b.md5_hash) for n, b in gcs_emulator.objects(bucket, "checkpoints/run-a/").items()
    }
    assert run_a_now == snapshots["run-a"]  # run-b wrote nothing into run-a, not even the same bytes again


def test_metadata_cache_is_uploaded_to_a_bucket(archives, gcs_emulator, bucket, tmp_path):
    """METADATA_CACHE_SYNC_URI=gs://...: the finished cache reaches the bucket, byte for byte."""
    cfg = tiny_config(tmp_path, archives[0])
    # TERM at the first KNN chunk: the index (and the cache upload) are done, no model is loaded.
    env = {"METADATA_CACHE_SYNC_URI": f"gs://{bucket}/caches/", "TRIPLET_FAILPOINT": "knn.chunk@1:TERM"}
    out = processor(cfg, env=env)
    assert out.returncode == 75, out.stderr[-3000:]
    blob = gcs_emulator.objects(bucket, "caches/")["caches/metadata_cache_complete.npz"]
    local = tmp_path / "out" / "dataset.work" / "metadata_cache_complete.npz"
    assert blob.download_as_bytes() == local.read_bytes()
