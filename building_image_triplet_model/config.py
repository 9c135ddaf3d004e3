"""The processor's configuration: the `data:` section of one YAML file.

The original project keeps one YAML for the trainer and the processor, so the file is read as it is:

* other top-level sections (`model`, `train`, `logging`, `auto_batch_size`, ...) belong to the trainer and
  are not validated; only the width of the embeddings the `model:` section implies is read (TrainerModel),
  for the preflight to compare with the model's;
* keys of `data:` that only the trainer reads (TRAINER_KEYS) are known and ignored;
* every other `data:` key any version of the original project used (LEGACY_KEYS, from its history on all
  branches) is accepted with one warning that says what it means now, and mapped where the meaning is the
  same (`accelerator: cuda` is `device: cuda`);
* a key nobody knows is a warning (a newer trainer's key must not stop a run), unless it is a near-miss of
  a key the processor reads: then it is an error suggesting that key (a typo must not silently fall back
  to a default).

Every key has a type, a default and a check; a wrong type or an impossible value is a ConfigError naming
the key. The processor never writes to the config file.

The file is read by io/yaml_file.py, the one bounded reader (UTF-8, size, what aliases expand to) that
every command reading a config uses.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .errors import ConfigError
from .io.yaml_file import MAX_CONFIG_BYTES, parse_yaml, read_text, short

__all__ = ["MAX_CONFIG_BYTES", "ConfigError", "DataConfig", "load", "parse_yaml", "read_text", "short"]

DEFAULT_MODEL = "vit_base_patch14_dinov2.lvd142m"

TRAINER_KEYS = frozenset({"num_difficulty_levels", "ucb_alpha", "cache_size"})
# The trainer (the original project's train.py) sizes its projection head from model.backbone_output_size,
# or when that is null from timm's num_features of model.backbone, this one when the key is absent. It does
# not read the artifact's backbone_output_size attribute, so a mismatch only shows when training starts.
TRAINER_DEFAULT_BACKBONE = "tf_efficientnetv2_s.in21k_ft_in1k"


@dataclass(frozen=True)
class TrainerModel:
    """What the trainer's `model:` section says about the width of the embeddings it will read."""

    backbone: str
    backbone_output_size: int | None


@dataclass(frozen=True)
class DataConfig:
    # Paths
    input_dir: str
    hdf5_path: str
    work_dir: str | None = None  # default: <hdf5 stem>.work next to the output
    embeddings_dir: str | None = None  # the embedding stores, shared by outputs naming it (default: work_dir)
    manifest: str | None = None  # aria2c manifest: the archives a run expects (scale-out, --follow)
    # Selection and splits
    n_samples: int | None = None  # number of targets to keep (None: all)
    n_images: int | None = None  # at most this many images (whole targets)
    val_size: float = 0.15
    test_size: float = 0.15
    seed: int = 0
    split_strategy: Literal["target", "cell"] = "target"
    split_cell_m: float = 500.0  # cell edge for split_strategy: cell
    knn_k: int = 50
    knn_chunk_rows: int = 100_000  # KNN rows per durable chunk
    # Model and embedding
    feature_model: str = DEFAULT_MODEL
    image_size: int | None = None  # None: the model's own input size
    pretrained: bool = True
    weights_path: str | None = None  # a local .safetensors file
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto"
    compile: bool = False
    channels_last: bool = False
    fast_decode: bool = True  # JPEG draft mode (DCT-domain downscale) when the target size allows
    embedding_dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = 64
    num_workers: int | None = None  # DataLoader decode workers (None: what the machine has, see machine.py)
    cpu_threads: int | None = None  # torch threads for a model on the CPU (None: see machine.py)
    prefetch_factor: int = 4
    index_workers: int | None = None  # index processes (None: one per core)
    tar_record_bytes: int = 10240  # the archives' record size: more trailing zeros mean an unfinished file
    # Durability
    embedding_chunk_interval_s: float = 60.0  # the most embedding work a kill can cost
    # Not read from the data: section: what loading it had to say (legacy keys), logged once at start, and
    # the trainer's model: section, checked against the model's width by the preflight.
    warnings: tuple[str, ...] = field(default=(), compare=False)
    trainer: TrainerModel | None = field(default=None, compare=False)

    @property
    def selects_subset(self) -> bool:
        return self.n_samples is not None or self.n_images is not None


# Every other data: key that a version of the original project used (its history on all branches: the
# config files, the README's examples, the SLURM scripts' configs, the code's data_cfg reads): what each
# means now, and the key it maps to (None: nothing to map, the value is not used).
_NO_SIMILARITY = "the processor stores geographic neighbours only (the trainer mines its triplets from those)"
LEGACY_KEYS: dict[str, tuple[str | None, str]] = {
    "accelerator": ("device", "was the old preprocessing's device; read as data.device"),
    "devices": (
        None,
        "was the old preprocessing's number of GPUs; this processor uses one GPU per process and scales "
        "out over VMs instead (Cloud Batch, docs/preprocessing_gcp.md), so the value is not used",
    ),
    "strategy": (
        None,
        "was the old preprocessing's multi-GPU strategy (ddp); one process per GPU needs none, so the "
        "value is not used",
    ),
    "checkpoint_interval_s": ("embedding_chunk_interval_s", "renamed embedding_chunk_interval_s"),
    "cnn_feature_model": (
        None,
        "was the old preprocessing's model for image-similarity difficulty; " + _NO_SIMILARITY + ", so the "
        "value is not used (the embeddings' model is data.feature_model)",
    ),
    "cnn_image_size": (None, "was the input size of cnn_feature_model, which is not used; not used"),
    "cnn_batch_size": (None, "was the batch size of cnn_feature_model, which is not used; not used"),
    "difficulty_metric": (None, "chose the old preprocessing's difficulty (geo, cnn); " + _NO_SIMILARITY),
    "precompute_backbone_embeddings": (
        None,
        "chose whether the old preprocessing stored backbone embeddings; this processor always does, so "
        "the value is not used",
    ),
    "use_precomputed_embeddings": (
        None,
        "chose whether the old trainer read stored embeddings; the artifact always holds them, so the "
        "value is not used",
    ),
    "store_raw_images": (
        None,
        "chose whether the old preprocessing stored image pixels; this processor stores embeddings only, "
        "so the value is not used",
    ),
    "pixel_embedding_downsample_factor": (
        None,
        "was the old preprocessing's pixel-embedding resolution; no pixels are stored, so not used",
    ),
    "use_legacy_preprocessing": (
        None,
        "chose between the old preprocessing's two methods; there is one, so the value is not used",
    ),
    "metadata_file": (
        None,
        "was the old preprocessing's metadata CSV; this processor reads each image's own .txt, so the "
        "value is not used",
    ),
}
_ACCELERATOR_TO_DEVICE = {"auto": "auto", "cuda": "cuda", "gpu": "cuda", "cpu": "cpu"}

_INT_MIN = {
    "batch_size": 1,
    "num_workers": 0,
    "prefetch_factor": 1,
    "index_workers": 0,
    "knn_k": 1,
    "knn_chunk_rows": 1,
    "cpu_threads": 0,
    "tar_record_bytes": 512,
}
# Beyond these a value is no setting for any machine (batch_size: 100000000 would fail only after KNN).
# What the machine's memory allows is checked once the image size is known (preflight.check_memory).
_INT_MAX = {
    "batch_size": 65_536,
    "num_workers": 4096,
    "prefetch_factor": 1024,
    "index_workers": 4096,
    "cpu_threads": 4096,
    "knn_k": 100_000,
    "knn_chunk_rows": 100_000_000,
    "image_size": 8192,
    "tar_record_bytes": 64 * 1024 * 1024,
}
# A week; half the equator.
_FLOAT_MAX = {"embedding_chunk_interval_s": 7 * 86400.0, "split_cell_m": 20_037_508.0}
_PATH_KEYS = ("input_dir", "hdf5_path", "work_dir", "embeddings_dir", "manifest", "weights_path")
_NOT_FROM_FILE = frozenset({"warnings", "trainer"})


def known_keys() -> frozenset[str]:
    return frozenset(f.name for f in fields(DataConfig)) - _NOT_FROM_FILE


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"data.{key}: {short(value)} is not one of {', '.join(map(str, args))}")
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = next(a for a in args if a is not type(None))
        return _check_type(key, value, inner)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"data.{key}: expected true or false, got {short(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"data.{key}: expected an integer, got {short(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"data.{key}: expected a finite number, got {short(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"data.{key}: expected a non-empty string, got {short(value)}")
        return value
    raise AssertionError(f"unhandled type {hint} for {key}")


def _near_miss(key: str) -> str | None:
    """The key the processor reads that an unknown key most likely misspells; None where none is close.
    Only keys the processor reads are suggested: a key it ignores would make the fix a no-op."""
    close = difflib.get_close_matches(key, sorted(known_keys()), n=1, cutoff=0.8)
    return close[0] if close else None


def _unknown_key(key: str) -> str:
    """A key nobody knows: an error where it misspells a key the processor reads, else the warning."""
    suggestion = _near_miss(key)
    if suggestion is not None:
        raise ConfigError(f"data.{key}: unknown key; did you mean data.{suggestion}?")
    return f"data.{key}: unknown key, not read by the processor (a key of a newer trainer?)"


def _translate_legacy(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop the trainer's keys, map or drop the old preprocessing's, and say what was done."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in data.items():
        if key in TRAINER_KEYS:
            continue
        if key not in LEGACY_KEYS:
            out[key] = value
            continue
        target, meaning = LEGACY_KEYS[key]
        if target is None:
            notes.append(f"data.{key}: {short(value)} {meaning}")
            continue
        if key == "accelerator":
            mapped = _ACCELERATOR_TO_DEVICE.get(str(value).lower())
            if mapped is None:
                raise ConfigError(
                    f"data.accelerator: {short(value)} is not one of {', '.join(_ACCELERATOR_TO_DEVICE)}"
                )
            value = mapped
        if target in data and data[target] != value:
            raise ConfigError(
                f"data.{key}: {short(data[key])} contradicts data.{target}: {short(data[target])}; "
                "keep one of them"
            )
        notes.append(f"data.{key}: {meaning}")
        out.setdefault(target, value)
    return out, notes


def from_mapping(data: Any, base_dir: Path | None = None) -> DataConfig:
    """Validate a `data:` mapping. Relative paths are resolved against base_dir (default: the current
    directory, as for every command-line tool)."""
    if not isinstance(data, dict):
        raise ConfigError("data: expected a mapping of keys to values")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"data: keys must be names, got {short(bad[0])}")
    data, notes = _translate_legacy(data)
    hints = get_type_hints(DataConfig)
    for key in sorted(set(data) - known_keys()):
        notes.append(_unknown_key(key))
        del data[key]
    for required in ("input_dir", "hdf5_path"):
        if data.get(required) is None:
            raise ConfigError(f"data.{required}: required")
    values = {key: _check_type(key, value, hints[key]) for key, value in data.items()}
    for key in _PATH_KEYS:
        if values.get(key):
            values[key] = str(((base_dir or Path.cwd()) / os.path.expanduser(values[key])).resolve())
    cfg = DataConfig(**values, warnings=tuple(notes))
    _check_values(cfg)
    return cfg


def _check_values(cfg: DataConfig) -> None:
    for key, low in _INT_MIN.items():
        value = getattr(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"data.{key}: must be >= {low}, got {value}")
    for key, high in (_INT_MAX | _FLOAT_MAX).items():
        value = getattr(cfg, key)
        if value is not None and value > high:
            raise ConfigError(f"data.{key}: must be <= {high:g}, got {short(value)}")
    for key in ("n_samples", "n_images", "image_size"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}: must be >= 1 or null, got {value}")
    for key in ("val_size", "test_size"):
        value = getattr(cfg, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{key}: must be in [0, 1), got {value}")
    if cfg.val_size + cfg.test_size >= 1.0:
        raise ConfigError(
            f"data.test_size: val_size + test_size must leave room for train, got "
            f"{cfg.val_size} + {cfg.test_size}"
        )
    if cfg.split_cell_m <= 0:
        raise ConfigError(f"data.split_cell_m: must be > 0, got {cfg.split_cell_m}")
    if cfg.embedding_chunk_interval_s < 0:
        raise ConfigError(
            f"data.embedding_chunk_interval_s: must be >= 0, got {cfg.embedding_chunk_interval_s}"
        )
    if cfg.tar_record_bytes % 512:
        raise ConfigError(f"data.tar_record_bytes: must be a multiple of 512, got {cfg.tar_record_bytes}")
    if cfg.weights_path is not None:
        if not cfg.pretrained:
            raise ConfigError("data.weights_path: set pretrained: true to load a weights file")
        if not cfg.weights_path.endswith(".safetensors"):
            raise ConfigError(
                f"data.weights_path: {cfg.weights_path}: only .safetensors files are loaded "
                "(pickle-based .pth/.bin files are never loaded; convert with safetensors.torch.save_file)"
            )
    if Path(cfg.hdf5_path).suffix not in (".h5", ".hdf5"):
        raise ConfigError(f"data.hdf5_path: {cfg.hdf5_path}: expected a .h5 or .hdf5 file name")
    if cfg.seed < 0:
        raise ConfigError(f"data.seed: must be >= 0, got {cfg.seed}")


def trainer_model(section: Any) -> TrainerModel | None:
    """The trainer's `model:` section as the trainer reads it; None where there is none (our own configs).
    Values the trainer would not accept are the trainer's to report: they are not checked here."""
    if not isinstance(section, dict):
        return None
    backbone = section.get("backbone", TRAINER_DEFAULT_BACKBONE)
    size = section.get("backbone_output_size")
    return TrainerModel(
        backbone=backbone if isinstance(backbone, str) and backbone else TRAINER_DEFAULT_BACKBONE,
        backbone_output_size=size if isinstance(size, int) and not isinstance(size, bool) else None,
    )


def load(path: str | os.PathLike[str]) -> DataConfig:
    """Read and validate a YAML config file (read only: the file is never written)."""
    path = Path(path)
    doc = parse_yaml(read_text(path), str(path))
    if not isinstance(doc, dict) or "data" not in doc:
        raise ConfigError(f"{path}: no `data:` section")
    try:
        cfg = from_mapping(doc["data"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return replace(cfg, trainer=trainer_model(doc.get("model")))


def with_overrides(cfg: DataConfig, **changes: Any) -> DataConfig:
    """A copy with some keys changed, checked like the file's values (tests and benchmarks)."""
    new = replace(cfg, **changes)
    _check_values(new)
    return new
