"""Fail fast: what can be checked before the long steps is checked before any archive is read, and a run
refused there leaves no folder or file behind."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import REPO, load, manifest_of, run_cli, tiny_config

from building_image_triplet_model import pipeline
from building_image_triplet_model.exit_codes import Exit


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def refused(cfg_path: Path, code: int, *expect: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the processor (in this process: torch is imported once); it must return ``code`` with every
    ``expect`` in its output, having written nothing (the config's folder holds nothing new)."""
    before = tree(cfg_path.parent)
    cfg, _ = load(cfg_path)
    capsys.readouterr()
    assert pipeline.execute(cfg) == code
    err = capsys.readouterr().err
    for text in expect:
        assert text in err, (text, err[-3000:])
    assert tree(cfg_path.parent) == before, "a refused run leaves nothing behind"
    assert "indexing" not in err
    return err


def processor_on_tmpfs(mount_point: Path, options: str, cfg: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the processor in a private mount namespace where ``mount_point`` is a tmpfs mounted with
    ``options``: a real read-only or full file system, without touching the machine's mounts."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("unshare -m is not allowed here")
    script = (
        f"mount -t tmpfs -o {options} tmpfs {mount_point} && exec {sys.executable} -m "
        f"building_image_triplet_model.dataset_processor --config {cfg} {shlex.join(args)}"
    )
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_output_under_a_file_is_refused_naming_the_path(archives, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    cfg = tiny_config(tmp_path, archives[0], hdf5_path=str(tmp_path / "afile" / "out" / "d.h5"))
    refused(cfg, Exit.CONFIG, f"{tmp_path / 'afile'} is a file", "configuration or usage", capsys=capsys)


def test_an_output_under_proc_is_refused(archives, tmp_path, capsys):
    cfg = tiny_config(tmp_path, archives[0], hdf5_path="/proc/triplet-test/out/d.h5")
    refused(cfg, Exit.CONFIG, "/proc/triplet-test/out", "cannot be written", capsys=capsys)
    assert not Path("/proc/triplet-test").exists()


def test_a_read_only_file_system_is_refused(archives, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = tiny_config(tmp_path, archives[0], hdf5_path=str(ro / "out" / "d.h5"))
    r = processor_on_tmpfs(ro, "ro", cfg)
    assert r.returncode == Exit.CONFIG, r.stderr[-2000:]
    assert f"{ro / 'out'}" in r.stderr and "Read-only file system" in r.stderr
    assert "Traceback" not in r.stderr


def test_too_little_free_space_is_refused_before_indexing(archives, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    cfg = tiny_config(tmp_path, archives[0], hdf5_path=str(small / "out" / "d.h5"))
    r = processor_on_tmpfs(small, "size=64k", cfg)
    assert r.returncode == Exit.CONFIG, r.stderr[-2000:]
    assert "GB free, the run writes about" in r.stderr and "indexing" not in r.stderr


def test_follow_mode_checks_the_space_when_the_first_archive_arrives(archives, tmp_path):
    """A download is running: the first archive here stands for the manifest's others."""
    one = tmp_path / "in"
    one.mkdir()
    os.link(archives[0] / "0003.tar", one / "0003.tar")
    small = tmp_path / "small"
    small.mkdir()
    manifest = manifest_of(tmp_path / "manifest.txt", archives[0])  # 0003, 0004, 0009
    cfg = tiny_config(tmp_path, one, hdf5_path=str(small / "out" / "d.h5"), manifest=str(manifest))
    r = processor_on_tmpfs(small, "size=64k", cfg, "--follow", "--wait-timeout-s", "30")
    assert r.returncode == Exit.CONFIG, r.stderr[-2000:]
    assert "GB free, the run writes about" in r.stderr and "indexing" not in r.stderr
    estimated = float(re.search(r"estimated from ([0-9.]+) GB of archives", r.stderr).group(1))
    assert estimated == pytest.approx(3 * (one / "0003.tar").stat().st_size / 1e9, abs=1e-3)


def test_the_merge_checks_the_artifacts_space_before_writing_it(archives, tmp_path):
    manifest = manifest_of(tmp_path / "manifest.txt", archives[0])
    run_uri = str(tmp_path / "run")
    worker = tiny_config(tmp_path / "w", archives[0], manifest=str(manifest))
    args = ("--config", str(worker), "--run-uri", run_uri, "--task-index", "0", "--task-count", "1")
    r = run_cli("dataset_processor", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    small = tmp_path / "small"
    small.mkdir()
    merge = tiny_config(
        tmp_path / "m",
        archives[0],
        manifest=str(manifest),
        hdf5_path=str(small / "d.h5"),
        work_dir=str(tmp_path / "m" / "work"),  # the restored shards fit; the artifact does not
    )
    r = processor_on_tmpfs(small, "size=64k", merge, "--merge", "--run-uri", run_uri)
    assert r.returncode == Exit.CONFIG, r.stderr[-2000:]
    assert f"{small}: 0.000 GB free, the artifact needs about" in r.stderr
    assert "Traceback" not in r.stderr and not (small / "d.h5.partial").exists()


def test_cuda_where_there_is_none_fails_at_once_with_both_versions(archives, tmp_path, capsys):
    import torch

    cfg = tiny_config(tmp_path, archives[0], device="cuda")
    out = refused(cfg, Exit.MODEL, "CUDA is not usable", capsys=capsys)
    assert f"built for CUDA {torch.version.cuda}" in out and "NVIDIA driver none found" in out


def test_a_model_name_typo_suggests_the_name(archives, tmp_path, capsys):
    cfg = tiny_config(tmp_path, archives[0], feature_model="test_resnett")
    out = refused(cfg, Exit.MODEL, "test_resnett", capsys=capsys)
    assert "did you mean test_resnet" in out


def test_a_weights_file_that_is_not_safetensors_is_refused(archives, tmp_path, capsys):
    bad = tmp_path / "w" / "fake.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x80\x04not a safetensors file at all")
    cfg = tiny_config(tmp_path / "c", archives[0], pretrained=True, weights_path=str(bad))
    refused(cfg, Exit.MODEL, "not a readable safetensors file", str(bad), capsys=capsys)


def test_the_original_projects_config_runs_with_one_warning_per_old_key(archives, tmp_path, capsys):
    """The trainer's sections and keys are read past; the old preprocessing's keys are warned about once."""
    import yaml

    doc = {
        "auto_batch_size": {"enabled": False, "mode": "power"},
        "data": {
            "hdf5_path": str(tmp_path / "out" / "dataset.h5"),
            "input_dir": str(archives[0]),
            "batch_size": 8,
            "num_workers": 0,
            "num_difficulty_levels": 5,
            "ucb_alpha": 2.0,
            "cache_size": 1000,
            "feature_model": "test_resnet.r160_in1k",
            "image_size": 32,
            "devices": "auto",
            "accelerator": "cpu",
            "strategy": "auto",
            "pretrained": False,
            "knn_k": 5,
        },
        "logging": {
            "project_name": "geo-triplet-net",
            "exp_name": None,
            "checkpoint_dir": "checkpoints",
            "offline": False,
        },
        "model": {
            "backbone": "vit_base_patch14_dinov2.lvd142m",
            "embedding_size": 128,
            "margin": 0.3,
            "backbone_output_size": None,
        },
        "train": {"lr": 0.0001, "max_epochs": 100, "precision": "16-mixed", "seed": 42},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    before = path.read_bytes()
    cfg, layout = load(path)
    assert cfg.device == "cpu" and len(cfg.warnings) == 3
    capsys.readouterr()
    assert pipeline.execute(cfg) == 0
    console = capsys.readouterr().err
    log = layout.log.read_text()
    for key in ("data.devices", "data.accelerator", "data.strategy"):
        assert log.count(key) == 1, key
        assert console.count(key) == 1, key
    # The trainer sizes its head from model.backbone (DINOv2: 768) while test_resnet embeds 96 features:
    # said once, with the fix, in the log and on the console.
    mismatch = "the trainer's config gives 768 features (model.backbone vit_base_patch14_dinov2.lvd142m"
    assert log.count(mismatch) == 1 and console.count(mismatch) == 1
    assert "set model.backbone_output_size: 96" in log
    assert path.read_bytes() == before  # the processor never writes to the user's config


# ----------------------------------------------------------------------------------- the trainer's width
def trainer_cfg(tmp_path: Path, archives_dir: Path, model_section: object, **data: object):
    """A config with the trainer's ``model:`` section beside ``data:``, as the original project keeps it."""
    import yaml

    from building_image_triplet_model import config

    doc = yaml.safe_load(tiny_config(tmp_path, archives_dir, **data).read_text())
    doc["model"] = model_section
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(doc))
    return config.load(path)


@pytest.mark.parametrize(
    ("section", "mismatch"),
    [
        ({"backbone": "test_resnet.r160_in1k", "backbone_output_size": None}, None),  # its num_features, 96
        ({"backbone": "test_resnet.r160_in1k", "backbone_output_size": 96}, None),
        ({"backbone": "resnet18", "backbone_output_size": 96}, None),  # the explicit size wins
        ({"backbone": "test_resnet.r160_in1k", "backbone_output_size": 512}, "gives 512 features"),
        ({"backbone": "resnet18"}, "gives 512 features (model.backbone resnet18"),
        # no backbone: the trainer takes its default
        ({"embedding_size": 128}, "model.backbone tf_efficientnetv2_s.in21k_ft_in1k"),
        ({"backbone": "no_such_model_xyz"}, "no_such_model_xyz is not a model timm can create"),
    ],
)
def test_the_trainers_width_is_checked_against_the_embeddings(archives, tmp_path, section, mismatch):
    from building_image_triplet_model import preflight

    cfg = trainer_cfg(tmp_path, archives[0], section)
    notes = preflight.resolve(cfg).notes
    if mismatch is None:
        assert notes == ()
    else:
        [note] = notes
        assert mismatch in note and "model.backbone_output_size: 96" in note, note


def test_without_the_trainers_model_section_nothing_is_compared(archives, tmp_path):
    from building_image_triplet_model import config, preflight

    cfg = config.load(tiny_config(tmp_path, archives[0]))
    assert cfg.trainer is None and preflight.resolve(cfg).notes == ()
    assert trainer_cfg(tmp_path, archives[0], "not a mapping").trainer is None


def test_the_width_is_what_the_model_returns_not_num_features(archives, tmp_path):
    """MobileNetV3 has 288 features and a head of its own: without a classifier it returns 1024."""
    import timm
    import torch

    from building_image_triplet_model import config, preflight

    cfg = config.load(tiny_config(tmp_path, archives[0], feature_model="mobilenetv3_small_050"))
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        real = model(torch.zeros(1, 3, 32, 32)).shape[-1]
    assert model.num_features != real == preflight.resolve(cfg).output_size == 1024


def test_compile_without_python_h_or_a_compiler_is_refused_at_once(archives, tmp_path):
    """Debian's python3 has no Python.h without python3-dev, and triton compiles its C helper against it:
    refused before anything runs, naming the file and the package (here against a headers folder of its own;
    this machine's interpreter has its headers)."""
    from building_image_triplet_model import preflight
    from building_image_triplet_model.errors import ConfigError

    cfg, _ = load(tiny_config(tmp_path, archives[0], compile=True))
    include = tmp_path / "include" / "python3.11"
    include.mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        preflight.check_compile(cfg, include)
    assert str(err.value).startswith(f"data.compile: true needs {include / 'Python.h'} (Debian: python3-dev)")
    assert err.value.code == Exit.CONFIG
    (include / "Python.h").write_text("/* the headers */\n")
    preflight.check_compile(cfg, include)
    cfg_off, _ = load(tiny_config(tmp_path / "off", archives[0], compile=False))
    preflight.check_compile(cfg_off, tmp_path / "nothing")
    # The interpreter's own headers are where the check looks by default.
    assert preflight.compile_toolchain_missing() == []
