from pathlib import Path

import pytest
import yaml

from building_image_triplet_model import config
from building_image_triplet_model.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def load(tmp_path, **data):
    base = {"input_dir": "in", "hdf5_path": "out/x.h5"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {**base, **data}}))
    return config.load(path)


def test_defaults_are_the_original_projects(tmp_path):
    cfg = load(tmp_path)
    assert cfg.feature_model == "vit_base_patch14_dinov2.lvd142m"
    assert (cfg.val_size, cfg.test_size, cfg.knn_k) == (0.15, 0.15, 50)
    assert cfg.image_size is None and cfg.pretrained is True
    assert cfg.work.name == "x.work" and cfg.rejects_path.name == "x.rejects.tsv"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"batch_szie": 4}, "data.batch_szie"),
        ({"batch_size": "64"}, "data.batch_size"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"batch_size": True}, "data.batch_size"),
        ({"pretrained": "yes"}, "data.pretrained"),
        ({"device": "tpu"}, "data.device"),
        ({"precision": "int8"}, "data.precision"),
        ({"val_size": 1.5}, "data.val_size"),
        ({"val_size": 0.5, "test_size": 0.5}, "data.test_size"),
        ({"n_samples": 0}, "data.n_samples"),
        ({"knn_k": 0}, "data.knn_k"),
        ({"split_strategy": "random"}, "data.split_strategy"),
        ({"hdf5_path": "out/x.npz"}, "data.hdf5_path"),
        ({"input_dir": None}, "data.input_dir"),
        ({"checkpoint_interval_s": -1}, "data.checkpoint_interval_s"),
        ({"weights_path": "w.pth"}, "data.weights_path"),
        ({"weights_path": "missing.safetensors"}, "data.weights_path"),
        ({"pretrained": False, "weights_path": "w.safetensors"}, "data.weights_path"),
    ],
)
def test_errors_name_the_key(tmp_path, data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load(tmp_path, **data)
    assert str(tmp_path / "c.yaml") in str(err.value)


def test_missing_file_and_section(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "c.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError, match="no `data:` section"):
        config.load(tmp_path / "c.yaml")


def test_other_sections_are_the_trainers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"input_dir": "i", "hdf5_path": "o.h5"}, "model": {"lr": 1}}))
    assert config.load(path).input_dir.endswith("/i")


def test_relative_paths_resolve_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load(tmp_path, input_dir="a/b")
    assert cfg.input_dir == str(tmp_path / "a" / "b")


def test_settings_fingerprint_ignores_throughput_knobs(tmp_path):
    a = load(tmp_path, batch_size=8, num_workers=1)
    b = load(tmp_path, batch_size=256, num_workers=14, checkpoint_interval_s=5)
    c = load(tmp_path, image_size=224)
    fp = config.fingerprint
    assert fp(a.settings()) == fp(b.settings())
    assert fp(a.settings()) != fp(c.settings())


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_committed_configs_are_valid(name):
    cfg = config.load(REPO / "configs" / name)
    assert cfg.hdf5_path.endswith(".h5")
