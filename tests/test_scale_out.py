"""Scale-out: three worker processes and a merge make the artifact a single run makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import REPO, assert_same_arrays, load, manifest_of, tiny_config

from building_image_triplet_model.inputs import work_split
from building_image_triplet_model.io.workdir import Layout

pytestmark = pytest.mark.slow


def worker_input(tmp: Path, archives_dir: Path, manifest: Path, index: int, count: int) -> Path:
    """What a worker VM downloads: only its own archives."""
    folder = tmp / f"raw{index}"
    folder.mkdir()
    for name in work_split.task_share(work_split.manifest_sources(manifest), index, count):
        os.link(archives_dir / f"{name}.tar", folder / f"{name}.tar")
    return folder


def processor(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "building_image_triplet_model.dataset_processor", "--config", str(cfg), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )


def test_three_workers_and_a_merge_equal_a_single_run(reference, archives, tmp_path):
    manifest = manifest_of(tmp_path / "manifest.txt", archives[0])
    run_uri = str(tmp_path / "bucket" / "checkpoints" / "run-1")
    assert work_split.task_share(work_split.manifest_sources(manifest), 0, 3) == ["0003"]
    cfgs = []
    for i in range(3):
        vm = tmp_path / f"vm{i}"
        cfg = tiny_config(
            vm,
            worker_input(tmp_path, archives[0], manifest, i, 3),
            manifest=str(manifest),
            num_workers=1,
        )
        cfgs.append(cfg)
    # Worker 1 is killed halfway through its embeddings (a real SIGKILL of its process group) ...
    killed = processor(
        cfgs[1],
        "--run-uri",
        run_uri,
        env={"TASK_INDEX": "1", "TASK_COUNT": "3", "TRIPLET_FAILPOINT": "embed.chunk@3"},
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    published = sorted(p.name for p in (Path(run_uri) / "shards" / "emb").glob("*/0004-*/*.npz"))
    assert len(published) >= 2  # chunks reach the run folder as they are written
    # ... and loses its disk: the retried task starts on a fresh VM and restores from the run folder.
    restored_cfg = tiny_config(
        tmp_path / "vm1b", Path(load(cfgs[1])[0].input_dir), manifest=str(manifest), num_workers=1
    )
    for i, cfg in enumerate([cfgs[0], restored_cfg, cfgs[2]]):
        out = processor(cfg, "--run-uri", run_uri, "--task-index", str(i), "--task-count", "3")
        assert out.returncode == 0, out.stderr[-3000:]
    log = load(restored_cfg)[1].log.read_text()
    assert "restored shards" in log
    # The merge: any machine, no archives, no GPU.
    merge_cfg = tiny_config(tmp_path / "merge", tmp_path / "no-archives-here", manifest=str(manifest))
    merged = processor(merge_cfg, "--merge", "--run-uri", run_uri)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "backbone" not in merged.stderr  # the merge never loads the model
    assert_same_arrays(Layout(reference).output, load(merge_cfg)[1].output)


def test_a_worker_with_other_settings_is_refused(archives, tmp_path):
    manifest = manifest_of(tmp_path / "manifest.txt", archives[0])
    run_uri = str(tmp_path / "bucket" / "run-2")
    first = tiny_config(
        tmp_path / "a", worker_input(tmp_path, archives[0], manifest, 0, 3), manifest=str(manifest)
    )
    out = processor(first, "--run-uri", run_uri, "--task-index", "0", "--task-count", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    settings = json.loads((Path(run_uri) / "run_settings.json").read_text())
    other = tiny_config(
        tmp_path / "b",
        worker_input(tmp_path, archives[0], manifest, 1, 3),
        manifest=str(manifest),
        image_size=48,
    )
    refused = processor(other, "--run-uri", run_uri, "--task-index", "1", "--task-count", "3")
    assert refused.returncode == 4
    assert (
        "refusing to join" in refused.stderr and "image_size: run has 32, this process 48" in refused.stderr
    )
    assert json.loads((Path(run_uri) / "run_settings.json").read_text()) == settings
    assert not (Path(run_uri) / "shards" / "index" / "0004.json").exists()


def test_a_merge_before_the_workers_finish_names_what_is_missing(archives, tmp_path):
    manifest = manifest_of(tmp_path / "manifest.txt", archives[0])
    run_uri = str(tmp_path / "bucket" / "run-3")
    worker = tiny_config(
        tmp_path / "w", worker_input(tmp_path, archives[0], manifest, 0, 2), manifest=str(manifest)
    )
    assert processor(worker, "--run-uri", run_uri, "--task-index", "0", "--task-count", "2").returncode == 0
    merge_cfg = tiny_config(tmp_path / "merge", tmp_path / "none", manifest=str(manifest))
    out = processor(merge_cfg, "--merge", "--run-uri", run_uri, "--wait-timeout-s", "0")
    assert out.returncode == 3 and "1 of 3 archives have no complete shard yet: 0004" in out.stderr


def test_subset_selection_is_refused_in_scale_out(archives, tmp_path):
    manifest = manifest_of(tmp_path / "manifest.txt", archives[0])
    cfg = tiny_config(
        tmp_path / "w",
        worker_input(tmp_path, archives[0], manifest, 0, 3),
        manifest=str(manifest),
        n_samples=5,
    )
    out = processor(cfg, "--run-uri", str(tmp_path / "run"), "--task-index", "0", "--task-count", "3")
    assert out.returncode == 2 and "leave both unset for a scale-out run" in out.stderr


def test_task_share_and_batch_env():
    names = [f"{i:04d}" for i in range(10)]
    shares = [work_split.task_share(names, i, 3) for i in range(3)]
    assert sorted(n for s in shares for n in s) == names and all(3 <= len(s) <= 4 for s in shares)
    assert work_split.task_from_env({"BATCH_TASK_INDEX": "2", "BATCH_TASK_COUNT": "5"}) == (2, 5)
    assert work_split.task_from_env({"TASK_INDEX": "0", "TASK_COUNT": "1", "BATCH_TASK_INDEX": "3"}) == (0, 1)
    assert work_split.task_from_env({}) is None
