"""Getting the result home: `fetch_result` against fake-gcs-server, with a finished run published the way the
VM publishes it (vm/publish.py's finalize and cloud_sync's push of the output folder), from a real engine run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gcp_helpers import Emulator

from building_image_triplet_model import config
from building_image_triplet_model.io.workdir import Layout
from building_image_triplet_model.remote import cloud_sync, fetch_result
from building_image_triplet_model.vm import publish

REPO = Path(__file__).resolve().parents[2]


def publish_run(reference: config.DataConfig, bucket: str, finished: bool = True) -> str:
    """The run's folder as a VM leaves it: output/ pushed, then (finished) the artifact and _SUCCESS.json."""
    layout = Layout(reference)
    run = f"gs://{bucket}/checkpoints/run-001"
    for path in (layout.stats, layout.rejects):
        cloud_sync.upload_file(path, f"{run}/output/{path.name}")
    if finished:
        code, summary = publish.upload_artifact(
            {"engine": {"output": str(layout.output)}, "output-uri": f"{run}/artifact", "run-id": "run-001"}
        )
        assert code == 0 and summary
    return run


def test_a_finished_run_is_fetched_verified_and_said_where(
    reference: config.DataConfig, gcs_emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    run = publish_run(reference, bucket)
    layout = Layout(reference)
    dest = tmp_path / "results"
    env = {**os.environ, **gcs_emulator.env()}
    proc = subprocess.run(
        [sys.executable, "-m", "building_image_triplet_model.remote.fetch_result", run, str(dest)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"the run's files are in {dest.resolve()}" in proc.stdout
    for path in (layout.output, layout.stats, layout.rejects):
        assert (dest / path.name).read_bytes() == path.read_bytes()
        assert "crc32c" in proc.stdout
    assert not list(dest.glob(".*.fetching"))
    # Again: nothing is downloaded, nothing changes.
    assert fetch_result.main([run, str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [".fetched.json", layout.output.name, layout.stats.name, layout.rejects.name]
    )


def test_an_unfinished_run_fetches_nothing(
    reference: config.DataConfig,
    gcs_emulator: Emulator,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = publish_run(reference, bucket, finished=False)
    assert fetch_result.main([run, str(tmp_path / "results")]) == 10
    assert "the run is not finished" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_users_file_is_never_overwritten_but_our_own_copy_is_updated(
    reference: config.DataConfig,
    gcs_emulator: Emulator,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = publish_run(reference, bucket)
    layout = Layout(reference)
    dest = tmp_path / "results"
    dest.mkdir()
    mine = dest / layout.stats.name
    mine.write_text('{"my": "notes"}\n')
    assert fetch_result.main([run, str(dest)]) == 2
    err = capsys.readouterr().err
    assert f"{mine}: exists and was not written by this command" in err
    assert mine.read_text() == '{"my": "notes"}\n'
    assert not (dest / layout.output.name).exists()  # refused before anything was fetched

    mine.unlink()
    assert fetch_result.main([run, str(dest)]) == 0
    # A copy this command wrote, unchanged since, may be replaced by the bucket's newer version.
    record = json.loads((dest / ".fetched.json").read_text())
    (dest / layout.rejects.name).write_text("older\n")
    record[layout.rejects.name] = cloud_sync.crc32c_of_file(dest / layout.rejects.name)
    (dest / ".fetched.json").write_text(json.dumps(record))
    assert fetch_result.main([run, str(dest)]) == 0
    assert (dest / layout.rejects.name).read_bytes() == layout.rejects.read_bytes()


def test_an_artifact_that_is_not_what_the_vm_uploaded_is_refused(
    reference: config.DataConfig,
    gcs_emulator: Emulator,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = publish_run(reference, bucket)
    layout = Layout(reference)
    bad = tmp_path / layout.output.name
    data = bytearray(layout.output.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, one flipped byte
    bad.write_bytes(bytes(data))
    cloud_sync.upload_file(bad, f"{run}/artifact/{bad.name}")
    assert fetch_result.main([run, str(tmp_path / "results")]) == 3
    assert "differ from _SUCCESS.json" in capsys.readouterr().err
    assert not (tmp_path / "results" / layout.output.name).exists()


def test_provision_fetch_with_the_committed_defaults(
    reference: config.DataConfig, gcs_emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gcp/provision.sh fetch` as an operator runs it: the committed gcp/provision.conf (no --set), the
    stand-in gcloud of tests/provision for the look, fake-gcs-server for the objects."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "provision"))
    from provision_helpers import FAKE_GCLOUD, checkout_copy

    repo = checkout_copy(
        tmp_path / "repo", origin="https://example.invalid/org/building-image-triplet-model.git"
    )
    (repo / ".venv").symlink_to(REPO / ".venv")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{FAKE_GCLOUD}" "$@"\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = {
        **os.environ,
        **gcs_emulator.env(),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_GCLOUD_STATE": str(tmp_path / "state.json"),
        "FAKE_GCLOUD_LOG": str(tmp_path / "calls.log"),
        "FAKE_GCLOUD_PROJECT": "operator-project-1",
    }
    script = repo / "gcp" / "provision.sh"

    def provision(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=300
        )

    assert provision("buckets").returncode == 0
    client = gcs_emulator.client()
    if client.lookup_bucket("building-triplets-processed") is None:
        client.create_bucket("building-triplets-processed")
    run = publish_run(reference, "building-triplets-processed")
    assert run == "gs://building-triplets-processed/checkpoints/run-001"  # CHECKPOINT_URI/RUN_ID
    r = provision("fetch")
    assert r.returncode == 0, r.stderr[-3000:]
    dest = repo / "build" / "results" / "run-001"
    assert f"the run's files are in {dest}" in r.stdout
    layout = Layout(reference)
    assert (dest / layout.output.name).read_bytes() == layout.output.read_bytes()
