"""status.py through the preprocess_resume command, run as a real process: read-only, any time."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from engine_helpers import run_cli, tiny_config

from building_image_triplet_model import config
from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.io.workdir import Layout
from tools import sample_data


def snapshot(*roots: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under the roots with its kind, size and mtime."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (p.is_dir(), st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


def status(cfg: Path, *extra: str) -> tuple[int, str, str]:
    proc = run_cli("preprocess_resume", "--config", str(cfg), *extra, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def status_json(cfg: Path) -> tuple[int, dict[str, Any]]:
    rc, out, _ = status(cfg, "--json")
    return rc, json.loads(out)


def copy_run(reference: config.DataConfig, tmp: Path, **overrides: Any) -> Path:
    """The reference's input and output, copied (times kept, so the archives' signatures hold), and a
    config over the copy with the reference's settings (and ``overrides``)."""
    shutil.copytree(reference.input_dir, tmp / "in")
    shutil.copytree(Layout(reference).output.parent, tmp / "out")
    return tiny_config(tmp, tmp / "in", **overrides)


INDEX_KINDS = {k for k in sample_data.BAD_KINDS if k not in sample_data.EMBED_TIME_KINDS}


# ---------------------------------------------------------------------------------------------- absent
def test_an_absent_output_exits_10_says_what_comes_and_creates_nothing(
    archives: tuple[Path, dict], tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path, archives[0])
    before = snapshot(tmp_path, archives[0])
    rc, out, _ = status(cfg)
    assert rc == Exit.WORK_REMAINS == 10
    assert snapshot(tmp_path, archives[0]) == before
    assert not (tmp_path / "out").exists()
    lines = out.splitlines()
    assert lines[0] == f"output: {tmp_path / 'out' / 'dataset.h5'}"
    assert "archives: not indexed 3 (0003 0004 0009)" in lines
    assert lines[-1] == (
        "next run: index 3 archive(s); embed 0 image(s) and every image of 3 archive(s) not indexed yet; "
        "choose the images and splits; compute the geographic KNN rows; assemble the HDF5 artifact"
    )
    rc, report = status_json(cfg)
    assert rc == 10 and report["complete"] is False and report["running_pid"] is None
    assert {s: v["status"] for s, v in report["steps"].items()} == dict.fromkeys(
        ("index", "plan", "knn", "embed", "assemble"), "pending"
    )
    assert report["steps"]["embed"]["model_key"] == "new"
    assert snapshot(tmp_path, archives[0]) == before


def test_an_absent_input_is_reported_as_the_next_runs_failure(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "nowhere")
    rc, out, _ = status(cfg)
    assert rc == 10
    assert f"next run: fail: {tmp_path / 'nowhere'}: input_dir does not exist" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_a_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n  input_dir: i\n  hdf5_path: o.h5\n  knn_kk: 3\n")
    rc, _, err = status(cfg)
    assert rc == Exit.CONFIG and "data.knn_kk: unknown key; did you mean data.knn_k?" in err


# -------------------------------------------------------------------------------------------- complete
def test_a_complete_output_exits_0_read_only_with_every_archive_reusable(
    reference: config.DataConfig, archives: tuple[Path, dict], tmp_path: Path
) -> None:
    cfg = copy_run(reference, tmp_path)
    before = snapshot(tmp_path)
    rc, out, _ = status(cfg)
    assert rc == Exit.OK
    assert snapshot(tmp_path) == before  # nothing written, not even a time changed
    lines = out.splitlines()
    assert lines[0] == f"output: {tmp_path / 'out' / 'dataset.h5'}  [COMPLETE]"
    assert "archives: reusable 3 (0003 0004 0009)" in lines
    assert lines[-1] == "next run: nothing: the artifact is complete"
    expected = archives[1]["expected_rejects"]
    by_index = ", ".join(f"{k}={v}" for k, v in sorted(expected.items()) if k in INDEX_KINDS)
    by_decoder = ", ".join(f"{k}={v}" for k, v in sorted(expected.items()) if k not in INDEX_KINDS)
    assert f"  found by the index: {by_index}" in lines
    assert f"  found by the decoder: {by_decoder}" in lines
    assert by_decoder == "decode_error=3, not_jpeg=3, truncated_scan=3"

    rc, report = status_json(cfg)
    assert rc == 0 and report["complete"] is True
    assert {n: a["state"] for n, a in report["archives"].items()} == dict.fromkeys(
        ("0003", "0004", "0009"), "reusable"
    )
    assert all(a["to_embed"] == 0 for a in report["archives"].values())
    assert report["rejects"] == expected
    assert set(report["rejects_found_by"]) == {"index", "decoder"}
    assert set(report["rejects_found_by"]["index"]) == INDEX_KINDS
    assert report["steps"]["embed"]["images_done"] == archives[1]["images"] + 3 * 3
    assert snapshot(tmp_path) == before


def test_other_knn_k_embeds_nothing_and_assembles_again(reference: config.DataConfig, tmp_path: Path) -> None:
    cfg = copy_run(reference, tmp_path, knn_k=3)
    before = snapshot(tmp_path / "out")
    rc, report = status_json(cfg)
    assert rc == 10 and report["complete"] is False
    steps = report["steps"]
    assert steps["plan"]["status"] == "done"  # the plan does not depend on k
    assert steps["knn"]["status"] == "pending" and steps["knn"]["rows_done"] == 0
    assert steps["embed"]["status"] == "done" and steps["embed"]["images_to_embed"] == 0
    assert steps["assemble"]["status"] == "pending"
    assert "replaced" in steps["assemble"]["note"]
    assert report["next_run"] == (
        "embed nothing (every image needed is embedded); compute the geographic KNN rows; "
        "assemble the HDF5 artifact"
    )
    assert snapshot(tmp_path / "out") == before


def test_a_smaller_selection_embeds_nothing_and_assembles_again(
    reference: config.DataConfig, tmp_path: Path
) -> None:
    cfg = copy_run(reference, tmp_path, n_samples=20)
    rc, report = status_json(cfg)
    assert rc == 10
    steps = report["steps"]
    assert steps["plan"]["status"] == "pending" and steps["plan"]["targets"] == 20
    assert steps["plan"]["images"] < 145
    assert steps["embed"]["images_to_embed"] == 0 and steps["embed"]["images_done"] == steps["plan"]["images"]
    assert steps["assemble"]["status"] == "pending"
    assert all(a["state"] == "reusable" for a in report["archives"].values())
    assert report["next_run"].startswith("embed nothing (every image needed is embedded); choose the images")
    assert report["next_run"].endswith("assemble the HDF5 artifact")


def test_another_model_embeds_every_image(reference: config.DataConfig, tmp_path: Path) -> None:
    cfg = copy_run(reference, tmp_path, image_size=48)
    rc, report = status_json(cfg)
    assert rc == 10
    emb = report["steps"]["embed"]
    assert emb["model_key"] == "new" and emb["images_done"] == 0 and emb["images_to_embed"] == 148
    assert {a["state"] for a in report["archives"].values()} == {"pending"}
    assert report["next_run"].startswith("embed 148 image(s); ")
    assert report["steps"]["plan"]["status"] == "done" and report["steps"]["assemble"]["status"] == "pending"


def test_an_added_archive_is_named_as_not_indexed(reference: config.DataConfig, tmp_path: Path) -> None:
    cfg = copy_run(reference, tmp_path)
    opts = sample_data.Options(out=tmp_path / "in", targets_per_archive=4, image_size=96, bad=True)
    assert sample_data.write_archive(opts, 3, [])["archive"] == "0012.tar"
    before = snapshot(tmp_path)
    rc, out, _ = status(cfg)
    assert rc == 10
    lines = out.splitlines()
    assert "archives: not indexed 1 (0012); reusable 3 (0003 0004 0009)" in lines
    assert lines[-1].startswith(
        "next run: index 1 archive(s); embed 0 image(s) and every image of 1 archive(s) not indexed yet"
    )
    assert "[COMPLETE]" not in lines[0]
    rc, report = status_json(cfg)
    assert report["archives"]["0012"] == {"state": "not indexed"}
    assert report["steps"]["index"] == {
        "status": "in progress",
        "archives_done": 3,
        "archives_total": 4,
        "images_indexed": 148,
        **{k: v for k, v in report["steps"]["index"].items() if k.startswith(("last_", "rate"))},
    }
    assert report["steps"]["embed"]["archives_not_indexed"] == 1
    assert snapshot(tmp_path) == before


def test_a_corrupt_plan_json_is_reported_pending_without_a_crash(
    reference: config.DataConfig, tmp_path: Path
) -> None:
    cfg = copy_run(reference, tmp_path)
    (tmp_path / "out" / "dataset.work" / "plan.json").write_bytes(b'{"key": "aaca6')
    rc, report = status_json(cfg)
    assert report["steps"]["plan"]["status"] == "pending"
    # The plan computed from the index has the recorded key: the artifact is still the current one.
    assert rc == 0 and report["complete"] is True
    rc, out, _ = status(cfg)
    assert "  plan      pending" in out


def test_a_corrupt_plan_npz_does_not_crash(reference: config.DataConfig, tmp_path: Path) -> None:
    cfg = copy_run(reference, tmp_path)
    plan_npz = tmp_path / "out" / "dataset.work" / "plan.npz"
    plan_npz.write_bytes(plan_npz.read_bytes()[:300])
    rc, report = status_json(cfg)
    # The plan is made again from the index (cheap); the artifact is still the run's.
    assert rc == 0 and report["steps"]["plan"]["status"] == "pending"
    assert report["steps"]["embed"]["images_to_embed"] == 0


def test_a_corrupt_plan_npz_still_sees_the_complete_artifact(
    reference: config.DataConfig, tmp_path: Path
) -> None:
    cfg = copy_run(reference, tmp_path)
    plan_npz = tmp_path / "out" / "dataset.work" / "plan.npz"
    plan_npz.write_bytes(plan_npz.read_bytes()[:300])
    _, report = status_json(cfg)
    assert report["steps"]["knn"]["status"] == "done"
    assert report["steps"]["assemble"]["status"] == "done"


# ------------------------------------------------------------------------------------------------ html
def test_html_writes_the_page_and_nothing_else(archives: tuple[Path, dict], tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, archives[0])
    page = tmp_path / "report" / "run.html"
    rc, _, _ = status(cfg, "--html", str(page))
    assert rc == 10
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "no plan yet" in text and "not complete" in text
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "cfg.yaml",
        "report",
        "report/run.html",
    ]


def test_html_of_a_complete_run(reference: config.DataConfig, tmp_path: Path) -> None:
    cfg = copy_run(reference, tmp_path)
    before = snapshot(tmp_path)
    page = tmp_path / "run.html"
    rc, _, _ = status(cfg, "--html", str(page))
    assert rc == 0
    text = page.read_text()
    assert "<h1>dataset.h5</h1>" in text and "<dt>state</dt><dd>complete</dd>" in text
    assert "KNN distances" in text
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != str(page)} == before
