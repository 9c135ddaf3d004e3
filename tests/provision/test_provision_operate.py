"""The operator's steps around a run, against the stand-in gcloud: `status` from a laptop reads the run's
progress from the bucket; `fetch` and the other local steps refuse before running when their bucket is not
there. (The steps' Python commands have their own tests against fake-gcs-server: tests/gcp/test_gcp_fetch.py,
test_gcp_mirror.py, test_gcp_weights.py; their gcloud commands go through the real parser in
test_provision_gcloud_parser.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from provision_helpers import PROVISION, FakeCloud, file_sets, mutations, run_script

BASE = ["--set", "PROJECT_ID=test-project", "--set", "REPO_URL=https://example.invalid/triplets.git"]
RUN = "gs://building-triplets-processed/checkpoints/run-001"


def provision(
    fake: FakeCloud, files: dict[str, Path], *args: str, check: bool = True
) -> tuple[int, str, str]:
    proc = run_script(PROVISION, [*BASE, *file_sets(files), *args], env=fake.env(), check=check)
    return proc.returncode, proc.stdout, proc.stderr


def test_status_shows_the_latest_progress_the_vm_pushed(
    fake_cloud: FakeCloud, run_files: dict[str, Path]
) -> None:
    provision(fake_cloud, run_files, "buckets")
    state = fake_cloud.read_state()
    older = {"event": "progress", "phase": "embed", "done": 10, "total": 100}
    newer = {"event": "progress", "phase": "embed", "done": 1250000, "total": 20000000, "rate": 141.5}
    lines = [json.dumps(older), json.dumps({"event": "log", "message": "x"})]
    state["objects"][f"{RUN}/logs/20261207T100000Z-1-job.jsonl"] = {
        "md5": "a",
        "text": "\n".join(lines) + "\n",
    }
    lines = [json.dumps(older), json.dumps(newer), json.dumps({"event": "log", "message": "y"})]
    state["objects"][f"{RUN}/logs/20261207T110000Z-2-job.jsonl"] = {
        "md5": "b",
        "text": "\n".join(lines) + "\n",
    }
    state["objects"][f"{RUN}/logs/20261207T110000Z-2-job.log"] = {"md5": "c", "text": "plain\n"}
    fake_cloud.write_state(state)
    _, out, _ = provision(fake_cloud, run_files, "status")
    assert f"latest progress (pushed every 30 min): {json.dumps(newer)}" in out


def test_status_before_any_push_says_so(fake_cloud: FakeCloud, run_files: dict[str, Path]) -> None:
    provision(fake_cloud, run_files, "buckets")
    _, out, _ = provision(fake_cloud, run_files, "status")
    assert "latest progress (pushed every 30 min): none yet" in out


def test_the_local_steps_need_their_bucket_first(fake_cloud: FakeCloud, run_files: dict[str, Path]) -> None:
    for step, bucket in (("fetch", "building-triplets-processed"), ("mirror", "building-triplets-raw")):
        code, _, err = provision(fake_cloud, run_files, step, check=False)
        assert code == 2
        assert f"gs://{bucket} does not exist: run gcp/provision.sh buckets first" in err
    assert mutations(fake_cloud.calls()) == []
