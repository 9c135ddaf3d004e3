"""A full disk at every step of a run: a real small tmpfs holds the output and the work folder, and a
failpoint fills it at the chosen moment (faults.py's FILL). The processor exits 2 with one line naming the
folder and the space, without a traceback (a cleanup that writes progress must not fail again on the same
full disk); once space is freed, the rerun completes with the artifact of a clean run.

Needs root (mount); each test mounts its own tmpfs and unmounts it in teardown. ~15 s per step.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_helpers import assert_same_arrays, finish, load, start_processor, tiny_config

from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.io.workdir import Layout

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
    pytest.mark.slow,  # ~30-60 s per step: two real runs of the processor
]

TMPFS_BYTES = 64 << 20  # the run writes a few MB; the preflight's estimate must fit

# The moment the disk fills: the write after it is the first of the step to fail.
STEPS = {
    "index": "write:0003.npz@1:FILL",  # the first shard is written: its marker, or the next shard, fails
    "plan": "write:metadata_cache_complete.npz@1:FILL",  # the merged index is written: the plan fails
    "knn": "plan.written@1:FILL",  # the plan is committed: the first KNN chunk fails
    "embedding": "embed.batch@1:FILL",  # the first batch is embedded: its chunk fails in the writer thread
    "assembly": "assemble.skeleton@1:FILL",  # the artifact's skeleton is written: the embeddings' copy fails
}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_full_disk_is_one_line_and_exit_2_and_the_rerun_completes(
    step: str, tmpfs: Path, tmp_path: Path, archives: tuple[Path, dict], reference
) -> None:
    cfg = tiny_config(tmp_path, archives[0], hdf5_path=str(tmpfs / "out" / "dataset.h5"))
    filler = tmpfs / "filler"
    os.environ["TRIPLET_FILL"] = str(filler)
    try:
        rc, out = finish(start_processor(cfg, STEPS[step]))
    finally:
        del os.environ["TRIPLET_FILL"]
    assert filler.exists(), out[-3000:]  # the failpoint was reached: the disk was full from there on
    assert rc == Exit.CONFIG, out[-3000:]
    assert "Traceback" not in out and "Logging error" not in out, out[-3000:]
    full = [line for line in out.splitlines() if "the disk is full" in line]
    assert len(full) == 1, out[-3000:]
    assert f"{tmpfs}/" in full[0] and "GB free; this run still writes about" in full[0]
    assert "ERROR" in full[0]
    # Space is freed: the rerun completes, and its artifact is a clean run's.
    filler.unlink()
    rc, out = finish(start_processor(cfg))
    assert rc == 0, out[-3000:]
    assert_same_arrays(load(cfg)[1].output, Layout(reference).output)
