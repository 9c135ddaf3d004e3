"""data.embeddings_dir: embedding stores shared by several outputs, each image embedded once per model.

Real processor runs (real subprocesses) on real sample archives with the tiny model; two processors at
the same time on two outputs sharing one folder, one of them killed with a real SIGKILL mid-embedding.
The module takes about 2 minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from engine_helpers import (
    assert_same_arrays,
    finish,
    kill_group,
    make_archives,
    read_artifact,
    run_cli,
    start_processor,
    tiny_config,
)

from building_image_triplet_model.vm import config_step
from building_image_triplet_model.vm.paths import VMPaths

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The archives, and a clean run (own work folder, no sharing) of each of the two outputs."""
    root = tmp_path_factory.mktemp("shared")
    archives = root / "archives"
    make_archives(archives, archives=3, targets=8, bad=False)
    clean = {}
    for name, knn_k in (("a", 5), ("b", 3)):
        cfg = tiny_config(root / f"clean_{name}", archives, knn_k=knn_k)
        proc = run_cli("dataset_processor", "--config", str(cfg))
        assert proc.returncode == 0, proc.stderr[-3000:]
        clean[name] = root / f"clean_{name}" / "out" / "dataset.h5"
    n = int(json.loads(clean["a"].with_name("dataset.stats.json").read_text())["images_embedded"])
    return {"archives": archives, "clean": clean, "n": n}


def _configs(tmp: Path, world: dict, shared: Path) -> dict[str, Path]:
    """Two outputs (other hdf5_path, other KNN setting) naming the same embeddings_dir."""
    return {
        name: tiny_config(
            tmp / name,
            world["archives"],
            hdf5_path=str(tmp / name / f"{name}.h5"),
            knn_k=knn_k,
            embeddings_dir=str(shared),
        )
        for name, knn_k in (("a", 5), ("b", 3))
    }


def _stats(cfg: Path) -> dict:
    out = Path(yaml.safe_load(cfg.read_text())["data"]["hdf5_path"])
    return json.loads(out.with_name(out.stem + ".stats.json").read_text())


def _artifact(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["data"]["hdf5_path"])


def _snapshot(folder: Path, skip: str = "users") -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != skip
    }


def _run(cfg: Path, *extra: str) -> tuple[int, str]:
    proc = run_cli("dataset_processor", "--config", str(cfg), *extra)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_second_output_embeds_nothing_and_the_status_names_the_shared_stores(
    tmp_path: Path, world: dict
) -> None:
    shared = tmp_path / "embeddings"
    cfgs = _configs(tmp_path, world, shared)
    rc, out = _run(cfgs["a"])
    assert rc == 0, out[-3000:]
    assert _stats(cfgs["a"])["images_embedded"] == world["n"]
    rc, out = _run(cfgs["b"])
    assert rc == 0, out[-3000:]
    assert (_stats(cfgs["b"])["images_embedded"], _stats(cfgs["b"])["images_reused"]) == (0, world["n"])
    a, b = read_artifact(_artifact(cfgs["a"])), read_artifact(_artifact(cfgs["b"]))
    emb = [k for k in a if "emb" in k.lower()]
    assert emb and all((a[k] == b[k]).all() for k in emb)
    for name in ("a", "b"):
        assert_same_arrays(_artifact(cfgs[name]), world["clean"][name])
    # The default is unchanged: each output's work folder has no emb/ of its own.
    assert not (tmp_path / "a" / "a.work" / "emb").exists()

    proc = run_cli("preprocess_resume", "--config", str(cfgs["a"]), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"embeddings: {shared} (shared folder; 3 of 3" in proc.stdout
    assert f"also {_artifact(cfgs['b'])}" in proc.stdout
    page = tmp_path / "page.html"
    proc = run_cli("preprocess_resume", "--config", str(cfgs["b"]), "--html", str(page), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = page.read_text()
    assert "(shared folder)" in html and str(_artifact(cfgs["a"])) in html


def test_two_processors_at_once_embed_each_image_once(tmp_path: Path, world: dict) -> None:
    cfgs = _configs(tmp_path, world, tmp_path / "embeddings")
    procs = {name: start_processor(cfg) for name, cfg in cfgs.items()}
    for proc in procs.values():
        rc, out = finish(proc)
        assert rc == 0, out[-3000:]
    assert sum(_stats(cfg)["images_embedded"] for cfg in cfgs.values()) == world["n"]
    for name, cfg in cfgs.items():
        assert_same_arrays(_artifact(cfg), world["clean"][name])


def _wait_for(what: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_one_killed_mid_embedding_the_other_completes_and_it_resumes(tmp_path: Path, world: dict) -> None:
    shared = tmp_path / "embeddings"
    cfgs = _configs(tmp_path, world, shared)
    # A stops at its 2nd chunk holding a store's lock; B embeds the other archives, then waits for that one.
    killed = start_processor(cfgs["a"], "embed.chunk@2:STALL")
    survivor = None
    try:
        _wait_for(lambda: len(list(shared.glob("*/*/*-*.npz"))) >= 2, killed)
        survivor = start_processor(cfgs["b"])
        b_log = tmp_path / "b" / "b.log"
        _wait_for(
            lambda: b_log.exists() and "waiting for the run that is embedding it" in b_log.read_text(),
            survivor,
        )
        assert f"(pid {killed.pid}," in b_log.read_text()
        kill_group(killed)  # a real SIGKILL mid-embedding, its lock held
        rc, out = finish(killed)
        assert rc == -9, out[-3000:]
        rc, out = finish(survivor)
        assert rc == 0, out[-3000:]
    finally:
        kill_group(killed)
        if survivor is not None:
            kill_group(survivor)
    assert_same_arrays(_artifact(cfgs["b"]), world["clean"]["b"])
    rc, out = _run(cfgs["a"])
    assert rc == 0, out[-3000:]
    assert _stats(cfgs["a"])["images_embedded"] == 0  # the survivor embedded what the killed run left
    assert_same_arrays(_artifact(cfgs["a"]), world["clean"]["a"])


def test_fresh_keeps_and_discard_refuses_the_shared_folder(tmp_path: Path, world: dict) -> None:
    shared = tmp_path / "embeddings"
    cfgs = _configs(tmp_path, world, shared)
    for cfg in cfgs.values():
        rc, out = _run(cfg)
        assert rc == 0, out[-3000:]
    before = _snapshot(shared, skip="")

    rc, out = _run(cfgs["b"], "--fresh")
    assert rc == 0, out[-3000:]
    assert _stats(cfgs["b"])["images_embedded"] == 0
    assert _snapshot(shared, skip="") == before

    artifact = _artifact(cfgs["b"]).read_bytes()
    rc, out = _run(cfgs["b"], "--discard-embeddings")
    assert rc == 2, out[-3000:]
    assert "--discard-embeddings" in out and str(_artifact(cfgs["a"])) in out and "Traceback" not in out
    assert _snapshot(shared, skip="") == before
    assert _artifact(cfgs["b"]).read_bytes() == artifact  # refused before anything was removed


def test_the_shared_folder_obeys_the_ownership_rules(tmp_path: Path, world: dict) -> None:
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_bytes(b"the user's own file")
    (tmp_path / "a_file").write_bytes(b"")
    for folder, words in (
        (users, "is not this engine's"),
        (world["archives"] / "emb", "lies inside data.input_dir"),
        (tmp_path / "a", "contains the work folder"),
        (tmp_path / "a_file" / "emb", "is a file, not a folder"),  # checked before anything is written
    ):
        cfg = _configs(tmp_path, world, folder)["a"]
        rc, out = _run(cfg)
        assert rc == 2, out[-3000:]
        assert words in out and "Traceback" not in out
    assert (users / "notes.txt").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"]
    assert not (world["archives"] / "emb").exists()


def test_the_vm_refuses_a_shared_embeddings_folder(tmp_path: Path) -> None:
    paths = VMPaths.from_env(
        {"TRIPLET_MOUNT_WORK": str(tmp_path / "w"), "TRIPLET_MOUNT_RAW": str(tmp_path / "r")}
    )
    text = yaml.safe_dump({"data": {"input_dir": "x", "hdf5_path": "o.h5", "embeddings_dir": "/mnt/emb"}})
    with pytest.raises(config_step.ConfigStepError, match="embeddings_dir is not supported on the VM"):
        config_step.effective_yaml(text, "metadata", paths, False, tmp_path / "m.txt", True)
