"""Kill the processor for real, at moments spread over every step, and resume until it finishes.

Each run is a real subprocess in its own process group. Failpoints (building_image_triplet_model/io/faults.py)
make the processor send itself a real SIGKILL or SIGTERM at named moments, so every step is hit
deterministically; other tests kill it from outside at random times. Every resumed run must end with an
artifact whose arrays equal those of the uninterrupted reference run, exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from engine_helpers import assert_same_arrays, finish, kill_group, load, tiny_config
from engine_helpers import start_processor as start

from building_image_triplet_model.io.workdir import Layout
from building_image_triplet_model.report import status

pytestmark = pytest.mark.slow

# In the order the processor reaches them; each run resumes from the previous kill.
KILL_CHAIN = [
    "write:0004.npz@1",  # an index shard fsynced but not yet renamed
    "index.source_done@1",
    "commit:*@1",  # an index shard's marker just written, the next not yet begun
    "write:metadata_cache_complete.npz@1",
    "plan.written@1",
    "knn.chunk@1",
    "write:*-*.npz@2",  # a KNN chunk between fsync and rename
    "embed.batch@2",  # results in memory, not yet in a chunk
    "embed.chunk@3",
    "commit:*/_SUCCESS.json@1",  # an embedding store's marker just written
    "write:*-*.npz@4",  # an embedding chunk between fsync and rename
    "embed.source_done@1",
    "embed.batch@4",
    "assemble.skeleton@1",
    "assemble.sync@1",
    "assemble.verified@1",  # the artifact complete under its .partial name
    "write:dataset.stats.json@1",
]
TERM_CHAIN = ["index.source_done@1", "knn.chunk@1", "embed.batch@2", "embed.chunk@3", "assemble.sync@1"]


@pytest.fixture
def cfg_path(archives, tmp_path):
    return tiny_config(tmp_path, archives[0], num_workers=2)


def index_mtimes(layout: Layout) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in layout.index_dir.glob("*")}


def test_sigkill_at_every_step_then_resume_equals_uninterrupted(reference, cfg_path):
    cfg, layout = load(cfg_path)
    frozen_index: dict[str, int] = {}
    for point in KILL_CHAIN:
        code, out = finish(start(cfg_path, point))
        assert code == -signal.SIGKILL, f"{point}: expected a kill, got {code}\n{out[-3000:]}"
        report = status.collect(cfg)
        assert not report["complete"] or point == "write:dataset.stats.json@1", point
        if point == "plan.written@1":
            frozen_index = index_mtimes(layout)  # from here on, the index is complete
    code, out = finish(start(cfg_path))
    assert code == 0, out[-3000:]
    assert index_mtimes(layout) == frozen_index  # a completed step is never redone
    assert_same_arrays(Layout(reference).output, layout.output)
    assert not list(layout.work.rglob("*.tmp"))


def test_sigterm_at_every_step_exits_75_then_resume_equals(reference, cfg_path):
    _cfg, layout = load(cfg_path)
    for point in TERM_CHAIN:
        code, out = finish(start(cfg_path, point + ":TERM"))
        assert code == 75, f"{point}: {code}\n{out[-3000:]}"
        assert "SIGTERM received" in out and "run the same command again" in out
    code, out = finish(start(cfg_path))
    assert code == 0, out[-3000:]
    assert_same_arrays(Layout(reference).output, layout.output)


def test_random_sigkills_from_outside(reference, cfg_path):
    rng = np.random.default_rng(20261129)
    _cfg, layout = load(cfg_path)
    for delay in rng.uniform(0.5, 14.0, size=6):
        proc = start(cfg_path)
        try:
            proc.wait(timeout=float(delay))
        except subprocess.TimeoutExpired:
            kill_group(proc, signal.SIGKILL)
        finish(proc)
        if layout.output.exists():
            break
    code, out = finish(start(cfg_path))
    assert code == 0, out[-3000:]
    assert_same_arrays(Layout(reference).output, layout.output)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def test_sigterm_to_the_main_process_during_embedding(reference, cfg_path):
    """Only the parent gets SIGTERM (as from `kill PID`): it stops its decode workers itself."""
    _cfg, layout = load(cfg_path)
    proc = start(cfg_path, "embed.batch@3:STALL")  # holds the run inside the embedding step
    wait_for(lambda: any(layout.emb_root.rglob("*-*.npz")) if layout.emb_root.exists() else False)
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
    assert_same_arrays(Layout(reference).output, layout.output)


def test_status_during_and_after_an_interruption(cfg_path):
    cfg, _ = load(cfg_path)
    code, _ = finish(start(cfg_path, "knn.chunk@1:TERM"))
    assert code == 75
    report = status.collect(cfg)
    assert report["steps"]["index"]["status"] == "done"
    assert report["steps"]["knn"]["status"] == "in progress" and report["steps"]["knn"]["rows_done"] > 0
    assert report["steps"]["embed"]["status"] == "pending" and report["steps"]["embed"]["images_to_embed"] > 0
    assert report["next_run"].startswith("embed ") and "compute the geographic KNN rows" in report["next_run"]
    assert report["rejects"]["duplicate_stem"] == 12
    assert report["steps"]["index"]["last_rate_per_s"] > 0


def test_a_duplicated_sigterm_is_one_stop_request(cfg_path):
    """A group SIGTERM plus a wrapper that forwards it deliver the same request twice: still a clean stop."""
    _cfg, layout = load(cfg_path)
    proc = start(cfg_path, "embed.batch@3:STALL")
    wait_for(lambda: any(layout.emb_root.rglob("*-*.npz")) if layout.emb_root.exists() else False)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finish(proc, timeout=60)
    assert code == 75, out[-3000:]
    assert out.count("SIGTERM received") == 1 and "again: exiting now" not in out


@pytest.mark.parametrize("damage", ["emptied", "zeroed"])
def test_a_skeleton_lost_to_a_power_cut_is_written_again(reference, cfg_path, damage):
    """A power cut can leave the half-assembled artifact empty or zeroed while its progress record survives
    (a SIGKILL keeps the page cache, so the damage a power cut does is made here by hand)."""
    _cfg, layout = load(cfg_path)
    code, out = finish(start(cfg_path, "assemble.sync@1"))
    assert code == -signal.SIGKILL, out[-3000:]
    assert layout.assemble_json.exists() and layout.partial.exists()
    size = layout.partial.stat().st_size
    with open(layout.partial, "r+b") as fh:
        if damage == "emptied":
            fh.truncate(0)
        else:
            fh.write(bytes(size))
    code, out = finish(start(cfg_path))
    assert code == 0, out[-3000:]
    assert f"{layout.partial} does not hold the skeleton" in out
    assert_same_arrays(Layout(reference).output, layout.output)
