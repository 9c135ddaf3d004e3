"""Kill the processor for real, at moments spread over every step, and resume until it finishes.

Each run is a real subprocess in its own process group. Failpoints (building_image_triplet_model/faults.py)
make the processor send itself a real SIGKILL or SIGTERM at named moments, so every step is hit
deterministically; other tests kill it from outside at random times. Every resumed run must end with an
artifact whose arrays equal those of the uninterrupted reference run, exactly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import REPO, assert_same_arrays, tiny_config

from building_image_triplet_model import config, preprocess_resume

pytestmark = pytest.mark.slow

# In the order the processor reaches them; each run resumes from the previous kill.
KILL_CHAIN = [
    "write:0004.npz@1",  # an index shard fsynced but not yet renamed
    "index.source_done@1",
    "write:metadata_cache_complete.npz@1",
    "plan.written@1",
    "knn.chunk@1",
    "write:*-*.npz@2",  # a KNN chunk between fsync and rename
    "embed.batch@2",  # results in memory, not yet in a chunk
    "embed.chunk@3",
    "write:*-*.npz@4",  # an embedding chunk between fsync and rename
    "embed.source_done@1",
    "embed.batch@4",
    "assemble.skeleton@1",
    "assemble.sync@1",
    "assemble.verified@1",  # the artifact complete under its .partial name
    "write:dataset.stats.json@1",
]
TERM_CHAIN = ["index.source_done@1", "knn.chunk@1", "embed.batch@2", "embed.chunk@3", "assemble.sync@1"]


def start(cfg_path: Path, failpoint: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRIPLET_FAILPOINT", None)
    if failpoint:
        env["TRIPLET_FAILPOINT"] = failpoint
    return subprocess.Popen(
        [sys.executable, "-m", "building_image_triplet_model.dataset_processor", "--config", str(cfg_path)],
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


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest.fixture
def cfg_path(archives, tmp_path):
    return tiny_config(tmp_path, archives[0], num_workers=2)


def index_mtimes(cfg: config.DataConfig) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (cfg.work / "index").glob("*")}


def test_sigkill_at_every_step_then_resume_equals_uninterrupted(reference, cfg_path):
    cfg = config.load(cfg_path)
    frozen_index: dict[str, int] = {}
    for point in KILL_CHAIN:
        code, out = finish(start(cfg_path, point))
        assert code == -signal.SIGKILL, f"{point}: expected a kill, got {code}\n{out[-3000:]}"
        report = preprocess_resume.collect(cfg)
        assert not report["complete"] or point == "write:dataset.stats.json@1", point
        if point == "plan.written@1":
            frozen_index = index_mtimes(cfg)  # from here on, the index is complete
    code, out = finish(start(cfg_path))
    assert code == 0, out[-3000:]
    assert index_mtimes(cfg) == frozen_index  # a completed step is never redone
    assert_same_arrays(reference.output, cfg.output)
    assert not list(cfg.work.rglob("*.tmp"))


def test_sigterm_at_every_step_exits_75_then_resume_equals(reference, cfg_path):
    cfg = config.load(cfg_path)
    for point in TERM_CHAIN:
        code, out = finish(start(cfg_path, point + ":TERM"))
        assert code == 75, f"{point}: {code}\n{out[-3000:]}"
        assert "SIGTERM received" in out and "run the same command again" in out
    code, out = finish(start(cfg_path))
    assert code == 0, out[-3000:]
    assert_same_arrays(reference.output, cfg.output)


def test_random_sigkills_from_outside(reference, cfg_path):
    rng = np.random.default_rng(20261129)
    cfg = config.load(cfg_path)
    for delay in rng.uniform(0.5, 14.0, size=6):
        proc = start(cfg_path)
        try:
            proc.wait(timeout=float(delay))
        except subprocess.TimeoutExpired:
            kill_group(proc, signal.SIGKILL)
        finish(proc)
        if cfg.output.exists():
            break
    code, out = finish(start(cfg_path))
    assert code == 0, out[-3000:]
    assert_same_arrays(reference.output, cfg.output)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def test_sigterm_to_the_main_process_during_embedding(reference, cfg_path):
    """Only the parent gets SIGTERM (as from `kill PID`): it stops its decode workers itself."""
    cfg = config.load(cfg_path)
    proc = start(cfg_path, "embed.batch@3:STALL")  # holds the run inside the embedding step
    wait_for(lambda: any((cfg.work / "emb").rglob("*-*.npz")) if (cfg.work / "emb").exists() else False)
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finish(proc, timeout=60)  # the stop watchdog ends even a stuck step (a hang guard only)
    assert code == 75, out[-3000:]

    def group_gone() -> bool:
        return not subprocess.run(
            ["pgrep", "-g", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()

    wait_for(group_gone, timeout=10)  # decode workers and helpers go with their parent
    code, out = finish(start(cfg_path))  # the lock is free at once, and nothing is lost
    assert code == 0, out[-3000:]
    assert_same_arrays(reference.output, cfg.output)


def test_status_during_and_after_an_interruption(cfg_path):
    cfg = config.load(cfg_path)
    code, _ = finish(start(cfg_path, "knn.chunk@1:TERM"))
    assert code == 75
    report = preprocess_resume.collect(cfg)
    assert report["steps"]["index"]["status"] == "done"
    assert report["steps"]["knn"]["status"] == "in progress" and report["steps"]["knn"]["rows_done"] > 0
    assert report["steps"]["embed"]["status"] == "pending"
    assert report["next_run"] == "continue at knn: compute the remaining geographic KNN rows"
    assert report["rejects"]["duplicate_stem"] == 12
    assert report["steps"]["index"]["last_rate_per_s"] > 0


def test_a_duplicated_sigterm_is_one_stop_request(cfg_path):
    """A group SIGTERM plus a wrapper that forwards it deliver the same request twice: still a clean stop."""
    cfg = config.load(cfg_path)
    proc = start(cfg_path, "embed.batch@3:STALL")
    wait_for(lambda: any((cfg.work / "emb").rglob("*-*.npz")) if (cfg.work / "emb").exists() else False)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finish(proc, timeout=60)
    assert code == 75, out[-3000:]
    assert out.count("SIGTERM received") == 1 and "again: exiting now" not in out
