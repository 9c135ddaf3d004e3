"""Pay only for what changed: embeddings are stored per archive, keyed by its content and the model, and
reused by every later run whatever its selection, splits, seed, KNN settings or other archives.

Each scenario changes one thing on a copy of a finished run, checks how many images were embedded (none,
or exactly the new ones), and that the artifact equals a from-scratch run with the same final settings.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from engine_helpers import (
    TINY,
    assert_same_arrays,
    finish,
    load,
    make_archives,
    start_processor,
    stats,
    tiny_config,
)

from building_image_triplet_model.engine import pipeline
from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.report import status
from tools import sample_data


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished run over three archives (its archives, output and work folder are copied per test)."""
    root = tmp_path_factory.mktemp("incremental")
    make_archives(root / "archives", archives=3, targets=8)
    cfg, layout = load(tiny_config(root, root / "archives"))
    assert pipeline.execute(cfg) == 0
    return {"root": root, "images": stats(layout)["images"]}


def workspace(base: dict, tmp: Path) -> Path:
    shutil.copytree(base["root"] / "archives", tmp / "archives")
    shutil.copytree(base["root"] / "out", tmp / "out")
    return tmp


def from_scratch(tmp: Path, archives: Path, **settings: object) -> Path:
    """The same final inputs and settings, in a folder of its own: nothing to reuse."""
    cfg, layout = load(tiny_config(tmp / "scratch", archives, **settings))
    assert pipeline.execute(cfg) == 0
    assert stats(layout)["images_reused"] == 0
    return layout.output


def run(tmp: Path, archives: Path, **settings: object) -> dict:
    cfg, layout = load(tiny_config(tmp, archives, **settings))
    assert pipeline.execute(cfg) == 0
    return {"stats": stats(layout), "output": layout.output, "layout": layout}


def add_archive(folder: Path, number: int = 3) -> int:
    """One more archive in the upstream layout; returns its good images."""
    return sample_data.write_archive(
        sample_data.Options(out=folder, targets_per_archive=6, bad=True), number, []
    )["images"] + len(
        sample_data.EMBED_TIME_KINDS
    )  # the planted not_jpeg, decode_error and truncated_scan images are rows too (invalid ones)


def test_adding_an_archive_embeds_only_its_images(base, tmp_path):
    ws = workspace(base, tmp_path)
    new = add_archive(ws / "archives")
    r = run(ws, ws / "archives")
    assert (r["stats"]["images_embedded"], r["stats"]["images_reused"]) == (new, base["images"])
    assert_same_arrays(r["output"], from_scratch(tmp_path, ws / "archives"))


def test_removing_an_archive_embeds_nothing(base, tmp_path):
    ws = workspace(base, tmp_path)
    (ws / "archives" / "0004.tar").unlink()
    r = run(ws, ws / "archives")
    assert r["stats"]["images_embedded"] == 0 and r["stats"]["sources"] == ["0003", "0009"]
    assert_same_arrays(r["output"], from_scratch(tmp_path, ws / "archives"))


@pytest.mark.parametrize(
    "change",
    [
        {"knn_k": 3},
        {"seed": 11},
        {"val_size": 0.3},
        {"test_size": 0.05},
        {"split_strategy": "cell"},
        {"n_samples": 9},
        {"n_images": 40},
    ],
    ids=lambda c: next(iter(c)),
)
def test_changing_the_selection_splits_seed_or_knn_embeds_nothing(base, tmp_path, change):
    ws = workspace(base, tmp_path)
    r = run(ws, ws / "archives", **change)
    assert r["stats"]["images_embedded"] == 0, change
    assert r["stats"]["images_reused"] == r["stats"]["images"]
    assert_same_arrays(r["output"], from_scratch(tmp_path, ws / "archives", **change))


def test_a_subset_first_then_the_rest_embeds_each_image_once(base, tmp_path):
    make_archives(tmp_path / "archives", archives=3, targets=8)
    first = run(tmp_path, tmp_path / "archives", n_samples=6)
    assert first["stats"]["images_embedded"] == first["stats"]["images"] < base["images"]
    rest = run(tmp_path, tmp_path / "archives")
    assert rest["stats"]["images_embedded"] == base["images"] - first["stats"]["images"]
    assert rest["stats"]["images_reused"] == first["stats"]["images"]
    assert_same_arrays(rest["output"], from_scratch(tmp_path, tmp_path / "archives"))


def seeded_weights(path: Path) -> str:
    """Other weights for the same tiny model, as a local safetensors file."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(99)
    model = timm.create_model(TINY["feature_model"], pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 48},
        {"precision": "bf16"},
        {"feature_model": "test_vit.r160_in1k"},
        {"pretrained": True, "weights_path": "WEIGHTS"},
        {"embedding_dtype": "float16"},
    ],
    ids=lambda c: next(iter(c)) if "weights_path" not in c else "weights",
)
def test_another_model_never_mixes_with_the_old_embeddings(base, tmp_path, change):
    if change.get("weights_path") == "WEIGHTS":
        change = {**change, "weights_path": seeded_weights(tmp_path / "other.safetensors")}
    ws = workspace(base, tmp_path)
    r = run(ws, ws / "archives", **change)
    assert r["stats"]["images_embedded"] == r["stats"]["images"] and r["stats"]["images_reused"] == 0
    assert len(list(r["layout"].emb_root.glob("*/model.json"))) == 2  # old and new side by side
    assert_same_arrays(r["output"], from_scratch(tmp_path, ws / "archives", **change))
    report = status.collect(load(tiny_config(ws, ws / "archives", **change))[0])
    assert (report["images_embedded"], report["images_reused"]) == (r["stats"]["images"], 0)
    back = run(ws, ws / "archives")  # and the first model's embeddings are still there
    assert back["stats"]["images_embedded"] == 0
    report = status.collect(load(tiny_config(ws, ws / "archives"))[0])
    assert (report["images_embedded"], report["images_reused"]) == (0, back["stats"]["images"])
    assert f"last run: 0 images embedded, {back['stats']['images']} reused" in status.render(report)


def test_fresh_keeps_embeddings_and_discard_embeddings_does_not(base, tmp_path):
    ws = workspace(base, tmp_path)
    cfg, layout = load(tiny_config(ws, ws / "archives"))
    assert pipeline.execute(cfg, fresh=True) == 0
    assert stats(layout)["images_embedded"] == 0 and stats(layout)["images_reused"] == base["images"]
    assert pipeline.execute(cfg, discard_embeddings=True) == 0
    assert stats(layout)["images_embedded"] == base["images"]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["embed.batch@1", "embed.chunk@1", "commit:*@1", "assemble.sync@1"])
def test_a_kill_during_an_incremental_run_resumes_to_the_same_artifact(base, tmp_path, point):
    ws = workspace(base, tmp_path)
    new = add_archive(ws / "archives")
    cfg_path = tiny_config(ws, ws / "archives")
    code, out = finish(start_processor(cfg_path, point))
    assert code == -signal.SIGKILL, out[-2000:]
    code, out = finish(start_processor(cfg_path))
    assert code == Exit.OK, out[-2000:]
    _, layout = load(cfg_path)
    assert stats(layout)["images_embedded"] <= new
    assert_same_arrays(layout.output, from_scratch(tmp_path, ws / "archives"))
