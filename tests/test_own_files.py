"""The engine deletes only what it wrote (ownership.py, workdir.Layout.discard): the real processor, real
archives, real folders of someone else's files, each compared by SHA-256 before and after."""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from engine_helpers import load, make_archives, run_cli, stats, tiny_config

from building_image_triplet_model.errors import ConfigError
from building_image_triplet_model.io.workdir import Layout

# Imported inside the tests that use them, so that the tests of whole processes also run (and fail) on the
# release before these modules' names existed.
OWNER_MARKER = "work_folder.json"  # workdir.OWNER_MARKER: checked by test_the_marker_is_the_layouts


def own() -> ModuleType:
    """building_image_triplet_model.engine.ownership"""
    return importlib.import_module("building_image_triplet_model.engine.ownership")


def test_the_marker_is_the_layouts(tmp_path: Path) -> None:
    from building_image_triplet_model.io.workdir import OWNER_MARKER as name

    _, layout = load(tiny_config(tmp_path, tmp_path / "in"))
    assert name == OWNER_MARKER and layout.owner_marker == layout.work / name


FIXTURES = Path(__file__).resolve().parent / "fixtures"
# A work folder exactly as the release before the marker left it (commit 93c7fca, tests/fixtures/README.md).
BEFORE_MARKER = FIXTURES / "work_folder_before_marker"


def sha256s(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under root (links not followed) and its SHA-256; ``skip``: a folder left out."""
    out = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and path.is_relative_to(skip):
            continue
        if path.is_file() and not path.is_symlink():
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def plant_user_files(folder: Path) -> None:
    """Someone's own files: a note, a nested photo, bytes that look like nothing of ours."""
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes, not the engine's\n")
    (folder / "photos" / "holiday.jpg").write_bytes(os.urandom(4096))


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "ERROR" in line or "error" in line]
    assert len(errors) == 1, stderr
    return errors[0]


# ------------------------------------------------------------------------------------------- unsafe work_dir
UNSAFE = ["input_dir", "input_parent", "user_folder", "inside_input", "link_to_input"]


@pytest.mark.parametrize("where", UNSAFE)
def test_an_unsafe_work_dir_is_refused_and_every_file_survives_runs_and_fresh_runs(
    tmp_path: Path, where: str
) -> None:
    data = tmp_path / "data"
    inp = data / "in"
    make_archives(inp, archives=2, targets=4, bad=False)
    (data / "README.txt").write_text("beside the input\n")
    plant_user_files(tmp_path / "mine")
    work = {
        "input_dir": inp,
        "input_parent": data,
        "user_folder": tmp_path / "mine",
        "inside_input": inp / "work",
        "link_to_input": tmp_path / "link",
    }[where]
    if where == "link_to_input":
        (tmp_path / "link").symlink_to(inp, target_is_directory=True)
    cfg = tiny_config(tmp_path, inp, work_dir=str(work))
    before = sha256s(tmp_path)
    runs = []
    for extra in ([], ["--fresh"], ["--discard-embeddings"], ["--fresh"]):
        runs.append((extra, run_cli("dataset_processor", "--config", str(cfg), *extra)))
        now = sha256s(tmp_path)
        assert {k: now.get(k) for k in before} == before, f"{extra}: files lost or changed"
    for extra, r in runs:
        assert r.returncode == 2, (extra, r.stderr)
        assert os.path.realpath(work) in one_line_error(r.stderr)  # the config resolves links
    assert sha256s(tmp_path) == before, "nothing is written before the refusal"
    assert not (tmp_path / "out").exists()
    assert not (inp / "work").exists()


def test_an_output_inside_input_dir_is_refused_with_extracted_folders(tmp_path: Path) -> None:
    """Extracted input: an output inside input_dir would make its own work folder a dataset folder."""
    archives = tmp_path / "archives"
    make_archives(archives, archives=2, targets=4, bad=False)
    inp = tmp_path / "extracted"
    for tar_path in sorted(archives.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            tar.extractall(inp / tar_path.stem, filter="data")
    cfg = tiny_config(tmp_path, inp, hdf5_path=str(inp / "dataset.h5"))
    # The work folder alone inside the input is refused the same way; the input inside the work folder too.
    others = [
        tiny_config(tmp_path, inp, name=f"w{i}.yaml", work_dir=str(w))
        for i, w in enumerate((inp / "0003" / "w", tmp_path))
    ]
    before = sha256s(tmp_path)
    for extra in ([], ["--fresh"]):
        r = run_cli("dataset_processor", "--config", str(cfg), *extra)
        assert r.returncode == 2, r.stderr
        line = one_line_error(r.stderr)
        assert f"data.hdf5_path {inp / 'dataset.h5'} lies inside data.input_dir {inp}" in line
        assert "with extracted folders its files would be read as a dataset" in line
        assert sha256s(tmp_path) == before
    for other, how in zip(others, ("lies inside", "contains"), strict=True):
        r = run_cli("dataset_processor", "--config", str(other), "--fresh")
        assert r.returncode == 2, r.stderr
        assert f"{how} data.input_dir" in one_line_error(r.stderr)
        assert sha256s(tmp_path) == before


def test_the_apart_from_input_check_resolves_links_both_ways(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in-link").symlink_to(inp, target_is_directory=True)
    (inp / "out-link").symlink_to(tmp_path / "out", target_is_directory=True)  # leads out: allowed
    cases = {
        str(tmp_path / "in-link" / "x.h5"): "lies inside",
        str(tmp_path / "in-link" / ".." / "in" / "x.h5"): "lies inside",
        str(inp / "out-link" / "x.h5"): None,
        str(tmp_path / "out" / "x.h5"): None,
    }
    for h5, how in cases.items():
        cfg, layout = load(tiny_config(tmp_path, inp, hdf5_path=h5))
        if how is None:
            own().check_apart_from_input(cfg, layout)
        else:
            with pytest.raises(ConfigError, match=how):
                own().check_apart_from_input(cfg, layout)


# ------------------------------------------------------------------------- --fresh in the engine's folder
def test_fresh_and_discard_embeddings_remove_only_the_engines_names(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    make_archives(inp, archives=1, targets=4, bad=False)
    cfg_path = tiny_config(tmp_path, inp)
    _, layout = load(cfg_path)
    assert run_cli("dataset_processor", "--config", str(cfg_path)).returncode == 0
    # Someone's files beside the output and inside the engine's own work folder, one named like a key folder.
    plant_user_files(layout.output.parent)
    plant_user_files(layout.work)
    (layout.work / "0123456789abcdef").mkdir()
    (layout.work / "0123456789abcdef" / "x.npz").write_bytes(b"not ours")
    (layout.work / "photos" / ".draft.a1b2.tmp").write_text("named like a temporary file of the engine's")
    theirs_beside = {
        k: v for k, v in sha256s(layout.output.parent, skip=layout.work).items() if "dataset" not in k
    }
    theirs_inside = {
        k: v
        for k, v in sha256s(layout.work).items()
        if k.split("/")[0] in ("notes.txt", "photos", "0123456789abcdef")
    }
    assert len(theirs_beside) == 2 and len(theirs_inside) == 4
    for extra in (["--fresh"], ["--discard-embeddings"]):
        r = run_cli("dataset_processor", "--config", str(cfg_path), *extra)
        assert r.returncode == 0, r.stderr
        now_beside = sha256s(layout.output.parent, skip=layout.work)
        now_inside = sha256s(layout.work)
        assert {k: now_beside.get(k) for k in theirs_beside} == theirs_beside, extra
        assert {k: now_inside.get(k) for k in theirs_inside} == theirs_inside, extra
        assert "removing" in r.stderr and "notes.txt" not in r.stderr
    assert stats(layout)["images_embedded"] == 15, "--discard-embeddings discarded the engine's embeddings"
    assert json.loads(layout.owner_marker.read_text())["owner"] == own().OWNER
    # The work folder removed to save space, the artifact kept: the artifact is known by its stats file.
    shutil.rmtree(layout.work)
    r = run_cli("dataset_processor", "--config", str(cfg_path))
    assert r.returncode == 0, r.stderr
    assert "is complete; nothing to do" in r.stderr


def test_a_file_at_hdf5_path_that_the_engine_did_not_make_is_refused(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    make_archives(inp, archives=1, targets=4, bad=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dataset.h5").write_bytes(os.urandom(2048))  # someone's own HDF5 file, say
    cfg_path = tiny_config(tmp_path, inp)
    before = sha256s(tmp_path)
    for extra in ([], ["--fresh"]):
        r = run_cli("dataset_processor", "--config", str(cfg_path), *extra)
        assert r.returncode == 2, r.stderr
        assert "data.hdf5_path is an existing file that this engine did not make" in one_line_error(r.stderr)
        assert sha256s(tmp_path) == before


def test_an_empty_existing_work_dir_is_taken_and_marked(tmp_path: Path) -> None:
    """Empty, or holding only the temporary file of a marker whose write a kill interrupted."""
    inp = tmp_path / "in"
    make_archives(inp, archives=1, targets=4, bad=False)
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / f".{OWNER_MARKER}.x8y7z6.tmp").write_text('{"own')
    cfg_path = tiny_config(tmp_path, inp, work_dir=str(tmp_path / "scratch"))
    r = run_cli("dataset_processor", "--config", str(cfg_path))
    assert r.returncode == 0, r.stderr
    marker = json.loads((tmp_path / "scratch" / OWNER_MARKER).read_text())
    assert marker["owner"] == own().OWNER and "adopted" not in marker


# -------------------------------------------------------------------------- the release before the marker
def test_a_work_folder_of_the_release_before_the_marker_is_adopted_and_reused(tmp_path: Path) -> None:
    """The fixture is the work folder that commit 93c7fca's processor wrote for these archives (the same
    seed gives the same bytes): it is adopted, and its embeddings are reused, not computed again."""
    inp = tmp_path / "in"
    make_archives(inp, archives=1, targets=4, bad=False)
    cfg_path = tiny_config(tmp_path, inp)
    _, layout = load(cfg_path)
    shutil.copytree(BEFORE_MARKER, layout.work)
    assert not layout.owner_marker.exists()
    r = run_cli("dataset_processor", "--config", str(cfg_path))
    assert r.returncode == 0, r.stderr
    assert "a work folder of an earlier release: adopted" in r.stderr
    marker = json.loads(layout.owner_marker.read_text())
    assert marker["owner"] == own().OWNER and "adopted" in marker
    assert (stats(layout)["images_embedded"], stats(layout)["images_reused"]) == (0, 15)
    # The earlier release's nested progress.json became the flat history.
    progress = json.loads(layout.progress_json.read_text())
    assert [h["pid"] for h in progress["history"]] == [30446, 29281]
    r = run_cli("dataset_processor", "--config", str(cfg_path), "--fresh")
    assert r.returncode == 0, r.stderr
    assert stats(layout)["images_embedded"] == 0


def _before_marker_copy(tmp_path: Path) -> Layout:
    work = tmp_path / "w"
    shutil.copytree(BEFORE_MARKER, work)
    _, layout = load(tiny_config(tmp_path, tmp_path / "in", work_dir=str(work)))
    return layout


def test_only_a_folder_of_exactly_that_releases_shape_is_adopted(tmp_path: Path) -> None:
    layout = _before_marker_copy(tmp_path)
    assert own().made_before_the_marker(layout) is None
    assert own().check_work_folder(layout) == "earlier release"
    (layout.work / ".progress.json.k2j3h4.tmp").write_text("{")  # a write a kill interrupted
    assert own().made_before_the_marker(layout) is None

    case = itertools.count()

    def refused(change: Callable[[Path], object], why: str) -> None:
        layout = _before_marker_copy(tmp_path / f"case{next(case)}")
        change(layout.work)
        assert why in (own().made_before_the_marker(layout) or "")
        with pytest.raises(ConfigError, match="is not this engine's"):
            own().check_work_folder(layout)
        before = sha256s(layout.work)
        with pytest.raises(ConfigError):
            own().claim_work_folder(layout)
        assert sha256s(layout.work) == before, "a refused folder gets nothing written"

    refused(lambda w: (w / "notes.txt").write_text("mine"), "it holds notes.txt")
    refused(lambda w: (w / ".notes.txt.a.tmp").write_text("mine"), "it holds .notes.txt.a.tmp")
    refused(lambda w: (w / "run.json").unlink(), "no run.json")
    refused(
        lambda w: (w / "run.json").write_text('{"started": "x", "mode": "single", "pid": 1}'), "no run.json"
    )
    refused(
        lambda w: (w / "run.json").write_text('{"started": "x", "mode": "mine", "model_key": "k", "pid": 1}'),
        "no run.json",
    )
    refused(lambda w: (w / "run.json").write_text("[]"), "no run.json")
    refused(lambda w: (w / "run.json").write_bytes(b"\xff"), "no run.json")
    refused(lambda w: (shutil.rmtree(w / "emb"), (w / "emb").write_text("x")), "emb is not a folder")
    refused(lambda w: (w / "plan.npz").unlink() or (w / "plan.npz").mkdir(), "plan.npz is not a regular file")
    refused(
        lambda w: (shutil.move(w / "emb", w.parent / "emb"), (w / "emb").symlink_to(w.parent / "emb")),
        "its emb is not a folder",
    )


def test_a_folder_of_user_files_is_never_adopted_and_an_unknown_marker_is_not_ours(tmp_path: Path) -> None:
    plant_user_files(tmp_path / "mine")
    _, layout = load(tiny_config(tmp_path, tmp_path / "in", work_dir=str(tmp_path / "mine")))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'mine'}: the work folder exists, is not empty"):
        own().check_work_folder(layout)
    (tmp_path / "mine" / OWNER_MARKER).write_text('{"owner": "someone else"}')
    with pytest.raises(ConfigError):
        own().check_work_folder(layout)


# ---------------------------------------------------------------------------------- bounded progress.json
def test_a_run_and_the_status_report_read_a_progress_file_nested_2000_deep(tmp_path: Path) -> None:
    """The release before the flat history nested every start's previous record: after enough restarts
    every run and the status report failed with a RecursionError."""
    from test_progress import nested_progress

    inp = tmp_path / "in"
    make_archives(inp, archives=1, targets=4, bad=False)
    cfg_path = tiny_config(tmp_path, inp)
    _, layout = load(cfg_path)
    shutil.copytree(BEFORE_MARKER, layout.work)
    layout.progress_json.write_text(nested_progress(2000))
    status = run_cli("preprocess_resume", "--config", str(cfg_path), "--json", timeout=120)
    assert status.returncode == 10, status.stderr
    assert json.loads(status.stdout)["last_run"]["pid"] == 2000
    r = run_cli("dataset_processor", "--config", str(cfg_path))
    assert r.returncode == 0, r.stderr
    state = json.loads(layout.progress_json.read_text())
    assert [h["pid"] for h in state["history"]][:2] == [2000, 1999]
    assert len(state["history"]) == 20
    status = run_cli("preprocess_resume", "--config", str(cfg_path), timeout=120)
    assert status.returncode == 0, status.stderr
