"""The processor's configuration (config.py): the `data:` section of the YAML shared with the trainer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from building_image_triplet_model import config
from building_image_triplet_model.config import ConfigError
from building_image_triplet_model.exit_codes import Exit

REPO = Path(__file__).resolve().parents[1]

# One YAML for trainer and processor, in the shape the original project's users keep.
SHARED_YAML = """\
auto_batch_size:
  enabled: true
  mode: binsearch
data:
  hdf5_path: data/processed/dataset.h5
  input_dir: data/raw/dataset_unaligned
  batch_size: 32
  num_workers: 4
  num_difficulty_levels: 5
  ucb_alpha: 2.0
  cache_size: 1000
  feature_model: vit_base_patch14_dinov2.lvd142m
  image_size: 518
  devices: "auto"
  accelerator: "auto"
  strategy: "auto"
logging:
  project_name: street-triplets
  exp_name: dinov2-baseline
  checkpoint_dir: checkpoints/
  offline: false
model:
  backbone: vit_base_patch14_dinov2.lvd142m
  embedding_size: 256
  margin: 0.3
  backbone_output_size: 768
  projection_hidden_dim: 512
  projection_dropout: 0.1
train:
  difficulty_update_freq: 2
  lr: 3.0e-4
  max_epochs: 40
  precision: bf16-mixed
  samples_per_epoch: 20000
  seed: 1234
  warmup_epochs: 1
  weight_decay: 0.05
"""
LEGACY = ("devices", "accelerator", "strategy")


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(tmp_path: Path, **data):
    base = {"input_dir": "in", "hdf5_path": "out/x.h5"}
    return config.load(write(tmp_path, yaml.safe_dump({"data": {**base, **data}})))


def error(tmp_path: Path, **data) -> str:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, **data)
    return str(err.value)


# ------------------------------------------------------------------------------ the shared trainer YAML
def test_shared_yaml_is_accepted_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(write(tmp_path, SHARED_YAML))
    assert cfg.input_dir == str(tmp_path / "data" / "raw" / "dataset_unaligned")
    assert cfg.hdf5_path == str(tmp_path / "data" / "processed" / "dataset.h5")
    assert (cfg.batch_size, cfg.num_workers, cfg.image_size) == (32, 4, 518)
    assert cfg.feature_model == "vit_base_patch14_dinov2.lvd142m"
    assert cfg.device == "auto"
    # the trainer's sections are not read: train.seed and train.precision are not the processor's
    assert cfg.seed == 0 and cfg.precision == "auto"


def test_trainer_keys_are_ignored_without_a_warning(tmp_path):
    cfg = config.load(write(tmp_path, SHARED_YAML))
    assert {"num_difficulty_levels", "ucb_alpha", "cache_size"} == config.TRAINER_KEYS
    for key in config.TRAINER_KEYS:
        assert not hasattr(cfg, key)
        assert not any(key in w for w in cfg.warnings)
    plain = load(tmp_path, num_difficulty_levels=5, ucb_alpha=2.0, cache_size=1000)
    assert plain.warnings == () and plain == load(tmp_path)
    # the trainer reads these with its own types: the processor does not check them
    assert load(tmp_path, ucb_alpha="not checked here").warnings == ()


def test_each_old_key_gives_one_warning_saying_what_it_means_now(tmp_path):
    cfg = config.load(write(tmp_path, SHARED_YAML))
    assert len(cfg.warnings) == 3
    for key in LEGACY:
        mine = [w for w in cfg.warnings if w.startswith(f"data.{key}:")]
        assert len(mine) == 1, (key, cfg.warnings)
    by_key = {w.split(":", 1)[0]: w for w in cfg.warnings}
    assert "data.device" in by_key["data.accelerator"]
    assert "GPU" in by_key["data.devices"] and "not used" in by_key["data.devices"]
    assert "'auto'" in by_key["data.devices"]  # the value as written
    assert "strategy" in by_key["data.strategy"] and "not used" in by_key["data.strategy"]


def test_config_file_is_never_written(tmp_path):
    path = write(tmp_path / "conf", SHARED_YAML)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = (path.read_bytes(), path.stat().st_mtime_ns, sorted(os.listdir(path.parent)))
    config.load(path)
    config.load(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns, sorted(os.listdir(path.parent))) == before


def test_config_file_may_be_read_only(tmp_path):
    path = write(tmp_path, SHARED_YAML)
    path.chmod(0o444)
    try:
        assert config.load(path).batch_size == 32
    finally:
        path.chmod(0o644)


# -------------------------------------------------------------------------------------------- legacy
@pytest.mark.parametrize(
    ("accelerator", "device"),
    [("cuda", "cuda"), ("gpu", "cuda"), ("GPU", "cuda"), ("cpu", "cpu"), ("auto", "auto")],
)
def test_accelerator_maps_to_device(tmp_path, accelerator, device):
    cfg = load(tmp_path, accelerator=accelerator)
    assert cfg.device == device
    assert len(cfg.warnings) == 1 and cfg.warnings[0].startswith("data.accelerator:")


def test_accelerator_agreeing_with_device_is_fine(tmp_path):
    assert load(tmp_path, accelerator="gpu", device="cuda").device == "cuda"
    assert load(tmp_path, accelerator="cpu", device="cpu").device == "cpu"


@pytest.mark.parametrize(("accelerator", "device"), [("cpu", "cuda"), ("gpu", "cpu"), ("auto", "cuda")])
def test_accelerator_contradicting_device_is_an_error(tmp_path, accelerator, device):
    msg = error(tmp_path, accelerator=accelerator, device=device)
    assert "data.accelerator" in msg and "data.device" in msg and "contradicts" in msg


@pytest.mark.parametrize("value", ["tpu", "mps", 1, None])
def test_accelerator_without_a_device_meaning_is_an_error(tmp_path, value):
    assert "data.accelerator" in error(tmp_path, accelerator=value)


def test_checkpoint_interval_s_is_renamed(tmp_path):
    cfg = load(tmp_path, checkpoint_interval_s=5)
    assert cfg.embedding_chunk_interval_s == 5.0
    assert not hasattr(cfg, "checkpoint_interval_s")
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith("data.checkpoint_interval_s:")
    assert "embedding_chunk_interval_s" in cfg.warnings[0]
    assert (
        load(tmp_path, checkpoint_interval_s=7, embedding_chunk_interval_s=7).embedding_chunk_interval_s == 7
    )
    msg = error(tmp_path, checkpoint_interval_s=5, embedding_chunk_interval_s=60)
    assert "data.checkpoint_interval_s" in msg and "data.embedding_chunk_interval_s" in msg
    assert "embedding_chunk_interval_s" in error(tmp_path, checkpoint_interval_s=-1)


def test_current_keys_give_no_warnings(tmp_path):
    cfg = load(tmp_path, device="cuda", embedding_chunk_interval_s=30, batch_size=8)
    assert cfg.warnings == ()


# ------------------------------------------------------------------------------------------- unknown
@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("knn_kk", "knn_k"),
        ("input_dirs", "input_dir"),
        ("batchsize", "batch_size"),
        ("hdf5path", "hdf5_path"),
        ("num_worker", "num_workers"),
        ("pretrain", "pretrained"),
        ("seeds", "seed"),
        ("imagesize", "image_size"),
    ],
)
def test_unknown_key_names_it_and_suggests_the_closest(tmp_path, key, suggestion):
    msg = error(tmp_path, **{key: 1})
    assert f"data.{key}: unknown key; did you mean data.{suggestion}?" in msg
    assert str(tmp_path / "c.yaml") in msg


@pytest.mark.parametrize("key", ["zzzzqqq", "pin_memory", "embedding_size", "acelerator", "warnings"])
def test_a_key_nobody_knows_is_one_warning_not_an_error(tmp_path, key):
    """A newer trainer's key must not stop a run; only a near-miss of a key the processor reads does."""
    cfg = load(tmp_path, **{key: ["x"]})
    note = f"data.{key}: unknown key, not read by the processor (a key of a newer trainer?)"
    assert cfg.warnings == (note,)
    assert cfg == load(tmp_path)  # and nothing else changes (`warnings` is not settable from the file)


def test_suggestions_are_only_keys_the_processor_reads(tmp_path):
    # every near-miss of a key the processor ignores (the trainer's, the old preprocessing's) is a warning
    for key in sorted(config.TRAINER_KEYS | config.LEGACY_KEYS.keys()):
        for typo in (key[:-1], key + "s", key.replace("_", "", 1)):
            if typo in config.known_keys() | config.TRAINER_KEYS | config.LEGACY_KEYS.keys():
                continue
            try:
                cfg = load(tmp_path, **{typo: 1})
            except ConfigError as exc:
                msg = str(exc)
            else:
                assert cfg.warnings[-1].startswith(f"data.{typo}: unknown key"), typo
                continue
            assert msg.rsplit("did you mean data.", 1)[1].rstrip("?") in config.known_keys(), (typo, msg)


# The original project's config files, every version on every branch (fixtures/original_configs/README.md).
ORIGINAL_CONFIGS = sorted((Path(__file__).parent / "fixtures" / "original_configs").glob("*.yaml"))


def test_the_original_configs_history_is_all_there():
    assert len(ORIGINAL_CONFIGS) == 18
    keys = set()
    for path in ORIGINAL_CONFIGS:
        keys |= set(yaml.safe_load(path.read_text())["data"])
    # the keys that the versions' own config files use, the old ones among them
    assert {"cnn_feature_model", "precompute_backbone_embeddings", "difficulty_metric"} <= keys
    assert {"use_legacy_preprocessing", "store_raw_images", "use_precomputed_embeddings"} <= keys


@pytest.mark.parametrize("path", ORIGINAL_CONFIGS, ids=lambda p: p.name[:8] + "-" + p.name.split("-", 1)[1])
def test_every_version_of_the_original_configs_is_accepted(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = yaml.safe_load(path.read_text())
    if "input_dir" not in doc["data"]:
        # the first version (45ef517) is the trainer's alone: its processor took --input-dir on the command
        # line; the one error is the missing folder, never a key, and naming one is all it takes
        with pytest.raises(ConfigError, match=r": data\.input_dir: required$"):
            config.load(path)
        path = write(tmp_path, yaml.safe_dump({**doc, "data": {**doc["data"], "input_dir": "in"}}))
    cfg = config.load(path)
    data = doc["data"]
    for key, value in data.items():
        if key in config.known_keys() and key not in ("input_dir", "hdf5_path"):
            assert getattr(cfg, key) == value, key  # read as written: same name, same meaning
    notes = {w.split(":", 1)[0] for w in cfg.warnings}
    assert notes == {f"data.{k}" for k in data if k in config.LEGACY_KEYS}, cfg.warnings  # one note each
    assert not any("unknown key" in w for w in cfg.warnings)
    if data.get("accelerator") in ("gpu", "cuda"):
        assert cfg.device == "cuda"


# ------------------------------------------------------------------------------------ types and values
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("batch_size", "32"),
        ("batch_size", 32.5),
        ("batch_size", True),
        ("batch_size", None),
        ("knn_k", 5.0),
        ("seed", 1.5),
        ("seed", False),
        ("pretrained", "yes"),
        ("pretrained", 1),
        ("compile", None),
        ("val_size", "0.1"),
        ("val_size", True),
        ("feature_model", 5),
        ("feature_model", ""),
        ("feature_model", None),
        ("device", "tpu"),
        ("device", "CUDA"),
        ("precision", "int8"),
        ("precision", "bf16-mixed"),
        ("split_strategy", "random"),
        ("embedding_dtype", "float64"),
        ("n_samples", "all"),
        ("image_size", [518]),
        ("input_dir", 5),
        ("input_dir", ["a", "b"]),
        ("hdf5_path", ""),
        ("tar_record_bytes", "10240"),
        ("manifest", {"path": "m.txt"}),
    ],
)
def test_wrong_types_name_the_key(tmp_path, key, value):
    msg = error(tmp_path, **{key: value})
    assert f"data.{key}:" in msg
    assert msg.startswith(str(tmp_path / "c.yaml") + ": ")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"val_size": 0.5, "test_size": 0.5}, "test_size"),
        ({"val_size": 0.7, "test_size": 0.4}, "test_size"),
        ({"val_size": -0.1}, "val_size"),
        ({"test_size": 1.0}, "test_size"),
        ({"seed": -1}, "seed"),
        ({"tar_record_bytes": 1000}, "tar_record_bytes"),
        ({"tar_record_bytes": 10241}, "tar_record_bytes"),
        ({"tar_record_bytes": 0}, "tar_record_bytes"),
        ({"weights_path": "w.pth"}, "weights_path"),
        ({"weights_path": "w.bin"}, "weights_path"),
        ({"weights_path": "w.safetensors", "pretrained": False}, "weights_path"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"prefetch_factor": 0}, "prefetch_factor"),
        ({"knn_k": 0}, "knn_k"),
        ({"knn_chunk_rows": 0}, "knn_chunk_rows"),
        ({"index_workers": -2}, "index_workers"),
        ({"cpu_threads": -1}, "cpu_threads"),
        ({"n_samples": 0}, "n_samples"),
        ({"n_images": -5}, "n_images"),
        ({"image_size": 0}, "image_size"),
        ({"split_cell_m": 0}, "split_cell_m"),
        ({"split_cell_m": -500}, "split_cell_m"),
        ({"embedding_chunk_interval_s": -1}, "embedding_chunk_interval_s"),
        ({"hdf5_path": "out/x.npz"}, "hdf5_path"),
        ({"hdf5_path": "out/x"}, "hdf5_path"),
        ({"val_size": float("nan")}, "val_size"),
    ],
)
def test_impossible_values_name_the_key(tmp_path, data, key):
    assert f"data.{key}:" in error(tmp_path, **data)


@pytest.mark.parametrize("key", ["split_cell_m", "embedding_chunk_interval_s"])
def test_nan_is_an_impossible_value(tmp_path, key):
    path = write(tmp_path, f"data:\n  input_dir: in\n  hdf5_path: o.h5\n  {key}: .nan\n")
    with pytest.raises(ConfigError, match=f"data.{key}"):
        config.load(path)


def test_boundary_values_are_accepted(tmp_path):
    cfg = load(
        tmp_path,
        val_size=0.0,
        test_size=0.0,
        seed=0,
        tar_record_bytes=512,
        batch_size=1,
        num_workers=0,
        knn_k=1,
        embedding_chunk_interval_s=0,
        hdf5_path="out/x.hdf5",
    )
    assert (cfg.val_size, cfg.test_size, cfg.tar_record_bytes, cfg.embedding_chunk_interval_s) == (
        0,
        0,
        512,
        0,
    )
    assert type(cfg.embedding_chunk_interval_s) is float
    assert load(tmp_path, val_size=0.49, test_size=0.5).test_size == 0.5
    assert load(tmp_path, tar_record_bytes=40 * 512).tar_record_bytes == 20480
    assert load(tmp_path, val_size=0).val_size == 0.0 and type(load(tmp_path, val_size=0).val_size) is float


def test_weights_path_must_be_safetensors_and_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load(tmp_path, weights_path="models/w.safetensors")
    assert cfg.weights_path == str(tmp_path / "models" / "w.safetensors") and cfg.pretrained is True
    assert "pickle" in error(tmp_path, weights_path="models/w.pth")
    assert "pretrained: true" in error(tmp_path, weights_path="w.safetensors", pretrained=False)


@pytest.mark.parametrize("key", ["input_dir", "hdf5_path"])
def test_required_keys(tmp_path, key):
    other = {"input_dir": "in", "hdf5_path": "o.h5"}
    del other[key]
    path = write(tmp_path, yaml.safe_dump({"data": other}))
    with pytest.raises(ConfigError, match=rf"data\.{key}: required"):
        config.load(path)
    with pytest.raises(ConfigError, match=rf"data\.{key}: required"):
        load(tmp_path, **{key: None})


def test_relative_paths_resolve_against_the_current_directory_not_the_config(tmp_path, monkeypatch):
    path = write(
        tmp_path / "conf",
        "data:\n  input_dir: raw/in\n  hdf5_path: ../out/x.h5\n  work_dir: w\n  manifest: m.txt\n",
    )
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    cfg = config.load(path)
    assert cfg.input_dir == str(run / "raw" / "in")
    assert cfg.hdf5_path == str(tmp_path / "out" / "x.h5")  # resolved: no '..' left
    assert cfg.work_dir == str(run / "w") and cfg.manifest == str(run / "m.txt")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load(tmp_path, input_dir="~/data").input_dir == str(tmp_path / "home" / "data")
    assert load(tmp_path, input_dir="/abs/in").input_dir == "/abs/in"


def test_from_mapping_base_dir(tmp_path):
    cfg = config.from_mapping({"input_dir": "in", "hdf5_path": "o.h5"}, base_dir=tmp_path)
    assert cfg.input_dir == str(tmp_path / "in") and cfg.hdf5_path == str(tmp_path / "o.h5")


@pytest.mark.parametrize(
    "key",
    [
        "n_samples",
        "n_images",
        "image_size",
        "num_workers",
        "cpu_threads",
        "index_workers",
        "work_dir",
        "manifest",
    ],
)
def test_null_for_optional_keys(tmp_path, key):
    path = write(tmp_path, f"data:\n  input_dir: in\n  hdf5_path: o.h5\n  {key}: null\n")
    assert getattr(config.load(path), key) is None
    path = write(tmp_path, f"data:\n  input_dir: in\n  hdf5_path: o.h5\n  {key}: ~\n")
    assert getattr(config.load(path), key) is None


def test_optional_ints_take_values(tmp_path):
    cfg = load(tmp_path, n_samples=2000, n_images=10, image_size=224, num_workers=3, index_workers=0)
    assert (cfg.n_samples, cfg.n_images, cfg.image_size, cfg.num_workers, cfg.index_workers) == (
        2000,
        10,
        224,
        3,
        0,
    )
    assert cfg.selects_subset and not load(tmp_path).selects_subset


def test_defaults(tmp_path):
    cfg = load(tmp_path)
    assert cfg.feature_model == "vit_base_patch14_dinov2.lvd142m" == config.DEFAULT_MODEL
    assert (cfg.val_size, cfg.test_size, cfg.knn_k, cfg.seed) == (0.15, 0.15, 50, 0)
    assert cfg.image_size is None and cfg.pretrained is True and cfg.device == "auto"
    assert cfg.tar_record_bytes == 10240 and cfg.embedding_chunk_interval_s == 60.0
    assert cfg.warnings == ()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model: {}\n", "no `data:` section"),
        ("- a\n- b\n", "no `data:` section"),
        ("", "no `data:` section"),
        ("data:\n", "data: expected a mapping"),
        ("data: [1, 2]\n", "data: expected a mapping"),
        ("data:\n  input_dir: [unclosed\n", "not valid YAML"),
        ("data:\n  1: x\n  input_dir: in\n  hdf5_path: o.h5\n", "keys must be names"),
    ],
)
def test_malformed_files(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        config.load(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        config.load(tmp_path / "nope.yaml")


def test_with_overrides_checks_values(tmp_path):
    cfg = load(tmp_path)
    assert config.with_overrides(cfg, batch_size=4).batch_size == 4
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        config.with_overrides(cfg, batch_size=0)
    with pytest.raises(ConfigError, match=r"data\.test_size"):
        config.with_overrides(cfg, val_size=0.9, test_size=0.1)


def test_error_is_a_value_error_with_the_config_exit_code(tmp_path):
    with pytest.raises(ValueError, match=r"data\.knn_k") as err:
        load(tmp_path, knn_k=0)
    assert isinstance(err.value, ConfigError) and err.value.code == Exit.CONFIG == 2


# ------------------------------------------------------------------------------------ committed configs
@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_committed_configs_are_accepted(name):
    cfg = config.load(REPO / "configs" / name)
    assert cfg.hdf5_path.endswith(".h5") and cfg.input_dir.startswith("/")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_committed_configs_have_no_warnings(name):
    # the committed configs spell today's keys (no checkpoint_interval_s, accelerator, ...)
    assert config.load(REPO / "configs" / name).warnings == ()


def test_there_are_committed_configs():
    assert {"demo.yaml", "laptop.yaml", "vm.yaml"} <= {p.name for p in (REPO / "configs").glob("*.yaml")}


def test_unset_workers_and_threads_follow_the_cores_this_process_may_use(tmp_path):
    from building_image_triplet_model.engine import machine

    cores = len(os.sched_getaffinity(0))
    cfg = load(tmp_path)
    # On the CPU the model is the bound: it gets every core, and one decode worker per core feeds it.
    assert (machine.decode_workers(cfg, "cpu"), machine.model_threads(cfg, "cpu")) == (cores, cores)
    assert (machine.decode_workers(cfg, "cuda"), machine.model_threads(cfg, "cuda")) == (max(1, cores - 2), 1)
    cfg = load(tmp_path, num_workers=3, cpu_threads=2)
    assert (machine.decode_workers(cfg, "cpu"), machine.model_threads(cfg, "cpu")) == (3, 2)
