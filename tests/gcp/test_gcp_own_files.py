"""The VM side deletes and overwrites only what it wrote: a restore through the Cloud Storage emulator into an
output folder that holds someone else's files, and a pull into a folder with a link leading out of it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from gcp_helpers import Emulator, run_script, sample_archives, script_env, write_manifest

from building_image_triplet_model.remote import cloud_sync
from building_image_triplet_model.remote.cloud_sync import CloudSyncError


def sha256s(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def users_files(folder: Path, text: str) -> None:
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text(f"{text} notes\n")
    (folder / "photos" / "dataset.log").write_text(f"{text}: a file named like the engine's log, elsewhere\n")


def test_a_restore_brings_back_only_the_engines_files_into_a_folder_of_user_files(
    tmp_path: Path, gcs_emulator: Emulator
) -> None:
    name = gcs_emulator.new_bucket()
    run = f"gs://{name}/checkpoints/run-1"
    # The checkpoint: the engine's files, and objects that are not the engine's under output/ (a file of the
    # same folder pushed by an older release, or put there by hand).
    ckpt = tmp_path / "ckpt"
    work = ckpt / "output" / "dataset.work"
    (work / "index").mkdir(parents=True)
    (work / "index" / "0003.json").write_text('{"source": "0003"}')
    (work / "run.json").write_text('{"mode": "single"}')
    (ckpt / "output" / "dataset.log").write_text("the engine's log\n")
    users_files(ckpt / "output", "the bucket's")
    (ckpt / "state").mkdir()
    (ckpt / "state" / "download.json").write_text(json.dumps({"status": "done", "attempts": 1}))
    cloud_sync.push_dir(ckpt / "output", f"{run}/output")
    cloud_sync.push_dir(ckpt / "state", f"{run}/state", markers=("*",))
    # This machine: a new work disk, and the output configured into a folder of the user's own files.
    mine = tmp_path / "mine"
    users_files(mine, "my")
    before = sha256s(mine)
    sample_archives(tmp_path / "src", archives=1)
    write_manifest(
        tmp_path / "manifest.txt", [(f"file://{tmp_path / 'src' / '0003.tar'}", "dataset_unaligned/0003.tar")]
    )
    cfg = tmp_path / "preprocess.yaml"
    cfg.write_text(
        yaml.safe_dump({"data": {"input_dir": str(tmp_path / "raw"), "hdf5_path": str(mine / "dataset.h5")}})
    )
    env = script_env(
        tmp_path,
        TRIPLET_RUN_ID="run-1",
        TRIPLET_CHECKPOINT_URI=f"gs://{name}/checkpoints",
        TRIPLET_MANIFEST_URI=str(tmp_path / "manifest.txt"),
        TRIPLET_PREPROCESS_CONFIG_FILE=str(cfg),
        TRIPLET_OVERRIDE_PATHS="0",
        **gcs_emulator.env(),
    )
    r = run_script("startup_preprocess.sh", "config", "restore", env=env)
    assert r.returncode == 0, r.stderr
    assert "restoring it" in r.stderr
    after = sha256s(mine)
    assert {k: after.get(k) for k in before} == before, "the user's files were overwritten"
    assert set(after) - set(before) == {
        "dataset.work/index/0003.json",
        "dataset.work/run.json",
        "dataset.log",
    }
    assert (tmp_path / "work" / "state" / "download.json").exists()


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_a_pull_never_writes_through_a_link_that_leads_out_of_its_folder(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "gcs":
        emu: Emulator = request.getfixturevalue("gcs_emulator")
        location = f"gs://{emu.new_bucket()}/run"
    else:
        location = str(tmp_path / "bucket" / "run")
    src = tmp_path / "src"
    (src / "index").mkdir(parents=True)
    (src / "index" / "notes.txt").write_text("from the bucket\n")
    (src / "plan.json").write_text("{}")
    cloud_sync.push_dir(src, location)
    elsewhere = tmp_path / "elsewhere"
    users_files(elsewhere, "my")
    before = sha256s(elsewhere)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "index").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CloudSyncError, match="leads outside"):
        cloud_sync.pull_dir(location, dest)
    assert sha256s(elsewhere) == before
    assert not (dest / "plan.json").exists(), "refused before any transfer"
