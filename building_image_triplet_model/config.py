"""The processor's configuration: one YAML file with a `data:` section.

Every key has a type, a default and a check; an unknown key, a wrong type or an impossible value is a
ConfigError that names the key. Other top-level sections (the trainer's own) are ignored here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

DEFAULT_MODEL = "vit_base_patch14_dinov2.lvd142m"


class ConfigError(ValueError):
    """A configuration the processor cannot run with; the message names the key."""


@dataclass(frozen=True)
class DataConfig:
    # Paths
    input_dir: str
    hdf5_path: str
    work_dir: str | None = None  # default: <hdf5 stem>.work next to the output
    manifest: str | None = None  # aria2c manifest: the archives a (scale-out) run expects
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
    num_workers: int = 4  # DataLoader decode workers
    cpu_threads: int = 0  # torch threads for the model on the CPU (0: torch's default)
    prefetch_factor: int = 4
    index_workers: int = 0  # 0: one per CPU core
    # Durability
    checkpoint_interval_s: float = 60.0

    # ---- derived paths -------------------------------------------------------------------------
    @property
    def output(self) -> Path:
        return Path(self.hdf5_path)

    @property
    def work(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        return self.output.with_name(self.output.stem + ".work")

    @property
    def rejects_path(self) -> Path:
        return self.output.with_name(self.output.stem + ".rejects.tsv")

    @property
    def log_path(self) -> Path:
        return self.output.with_name(self.output.stem + ".log")

    @property
    def stats_path(self) -> Path:
        return self.output.with_name(self.output.stem + ".stats.json")

    @property
    def selects_subset(self) -> bool:
        return self.n_samples is not None or self.n_images is not None

    # ---- fingerprints --------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The settings that change the artifact's contents (not paths, batch size or worker counts)."""
        return dict(self._settings)

    @property
    def settings_fp(self) -> str:
        return fingerprint(self._settings)

    def changed_settings(self, old: dict[str, Any]) -> list[str]:
        """The keys whose value in ``old`` (a recorded run's settings) differs from ours."""
        ours = self._settings
        return sorted(k for k in set(old) | set(ours) if old.get(k) != ours.get(k))

    @functools.cached_property
    def _settings(self) -> dict[str, Any]:
        # Computed once per config: it hashes the weights file, which can be hundreds of MB.
        keys = [
            "n_samples",
            "n_images",
            "val_size",
            "test_size",
            "seed",
            "split_strategy",
            "knn_k",
            "feature_model",
            "image_size",
            "pretrained",
            "precision",
            "fast_decode",
            "embedding_dtype",
        ]
        out = {k: getattr(self, k) for k in keys}
        if self.split_strategy == "cell":
            out["split_cell_m"] = self.split_cell_m
        out["weights_sha256"] = file_sha256(self.weights_path) if self.weights_path else None
        return out


_INT_MIN = {
    "batch_size": 1,
    "num_workers": 0,
    "prefetch_factor": 1,
    "index_workers": 0,
    "knn_k": 1,
    "knn_chunk_rows": 1,
    "cpu_threads": 0,
}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"data.{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = next(a for a in args if a is not type(None))
        return _check_type(key, value, inner)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"data.{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"data.{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"data.{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"data.{key}: expected a non-empty string, got {value!r}")
        return value
    raise AssertionError(f"unhandled type {hint} for {key}")


def from_mapping(data: dict[str, Any], base_dir: Path | None = None) -> DataConfig:
    """Validate a `data:` mapping. Relative paths are resolved against base_dir (default: the current
    directory, as for every command-line tool)."""
    if not isinstance(data, dict):
        raise ConfigError("data: expected a mapping of keys to values")
    hints = get_type_hints(DataConfig)
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"data.{unknown[0]}: unknown key (known keys: {', '.join(sorted(known))})")
    for required in ("input_dir", "hdf5_path"):
        if data.get(required) is None:
            raise ConfigError(f"data.{required}: required")
    values = {key: _check_type(key, value, hints[key]) for key, value in data.items()}
    for key in ("input_dir", "hdf5_path", "work_dir", "manifest", "weights_path"):
        if values.get(key):
            values[key] = str(((base_dir or Path.cwd()) / os.path.expanduser(values[key])).resolve())
    cfg = DataConfig(**values)
    _check_values(cfg)
    return cfg


def _check_values(cfg: DataConfig) -> None:
    for key, low in _INT_MIN.items():
        if getattr(cfg, key) < low:
            raise ConfigError(f"data.{key}: must be >= {low}, got {getattr(cfg, key)}")
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
    if cfg.checkpoint_interval_s < 0:
        raise ConfigError(f"data.checkpoint_interval_s: must be >= 0, got {cfg.checkpoint_interval_s}")
    if cfg.weights_path is not None:
        if not cfg.pretrained:
            raise ConfigError("data.weights_path: set pretrained: true to load a weights file")
        if not cfg.weights_path.endswith(".safetensors"):
            raise ConfigError(
                f"data.weights_path: {cfg.weights_path}: only .safetensors files are loaded "
                "(pickle-based .pth/.bin files are never loaded; convert with safetensors.torch.save_file)"
            )
        if not Path(cfg.weights_path).is_file():
            raise ConfigError(f"data.weights_path: {cfg.weights_path}: no such file")
    if cfg.output.suffix not in (".h5", ".hdf5"):
        raise ConfigError(f"data.hdf5_path: {cfg.hdf5_path}: expected a .h5 or .hdf5 file name")
    if cfg.seed < 0:
        raise ConfigError(f"data.seed: must be >= 0, got {cfg.seed}")


def load(path: str | os.PathLike[str]) -> DataConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or "data" not in doc:
        raise ConfigError(f"{path}: no `data:` section")
    try:
        return from_mapping(doc["data"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable short digest of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
