"""Fail fast: everything that can be checked before the long steps is checked within seconds of start,
before any archive is read, and before anything is written.

* the output location can be written (a read-only file system, a path under /proc, a parent that is a
  file: ConfigError naming the path, exit 2) -- probed with a temporary folder that is removed again;
* the free disk space covers an estimate of what the run writes (exit 2);
* the model name is one timm knows (a close name is suggested);
* the weights: a local file exists and is a safetensors file, or the hub's file is in the cache, or the hub
  answers (then the weights are fetched now); offline is one clear error at once (exit 6);
* the device: ``cuda`` must run a bf16 matmul, and a failure names the driver's and torch's CUDA versions
  (exit 6); ``auto`` takes CUDA only when it works.
* ``compile: true``: triton and inductor compile C helpers with gcc against ``Python.h``; without them the
  run is refused now (exit 2), not when the first batch compiles.
* the trainer: where the config has the trainer's ``model:`` section, the width it will size its head for
  is compared with the embeddings' width; a mismatch is a warning (the artifact is right, the trainer's
  config is not, and it is not ours to write).

The result, :class:`Resolved`, carries what later steps need: the device, the precision, the weights file
and the model identity (its key names the embedding store).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DataConfig
from .errors import BackboneError, ConfigError
from .identity import ModelIdentity, file_sha256

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"
# A generous per-image size of what a run writes besides the embeddings: index row (~200 B), merged cache,
# artifact metadata and locators (~250 B).
META_BYTES_PER_IMAGE = 600
# Without an index yet, how many images an archive of a given size holds: a 640x640 street-view JPEG and its
# metadata take ~30-60 kB in the real archives; 20 kB errs on the side of more images (more space).
ARCHIVE_BYTES_PER_IMAGE = 20_000


@dataclass(frozen=True)
class Resolved:
    device: str  # cpu, cuda
    precision: str  # fp32, tf32, bf16, fp16
    weights_file: str | None  # the safetensors file to load; None for random weights
    identity: ModelIdentity
    output_size: int
    versions: dict[str, str]
    notes: tuple[str, ...] = ()  # warnings for the log (the trainer check)


# ---------------------------------------------------------------------------------------- output location
def check_output_location(*paths: Path) -> None:
    """Each path's first existing ancestor is a folder this process can create entries in."""
    for path in paths:
        probe_dir = path
        while not probe_dir.exists():
            if probe_dir.parent == probe_dir:
                break
            probe_dir = probe_dir.parent
        if probe_dir.exists() and not probe_dir.is_dir():
            raise ConfigError(f"{path}: cannot be created: {probe_dir} is a file, not a folder")
        try:
            Path(tempfile.mkdtemp(prefix=".triplet-probe-", dir=probe_dir)).rmdir()
        except OSError as exc:
            raise ConfigError(
                f"{path}: the output location cannot be written ({probe_dir}: {exc.strerror or exc})"
            ) from None


def check_output_file(output: Path) -> None:
    """The artifact's path names a file to be written, not a folder that is there."""
    if output.is_dir():
        raise ConfigError(f"data.hdf5_path: {output} is a folder; name the artifact's file")


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: DataConfig, size: int, workers: int) -> None:
    """The decode buffers a batch size needs fit in half the machine's memory: each worker holds
    prefetch_factor batches of uint8 pixels, and the model's batch is float32 (4 bytes per value)."""
    batch = cfg.batch_size * 3 * size * size
    need = batch * (cfg.prefetch_factor * max(1, workers) + 1 + 4)
    have = memory_bytes()
    if need > have // 2:
        raise ConfigError(
            f"data.batch_size: {cfg.batch_size} images of {size} px need about {need / 2**30:.1f} GiB of "
            f"decode buffers ({cfg.prefetch_factor} batches ahead in each of {max(1, workers)} workers, "
            f"and the model's batch); this machine has {have / 2**30:.1f} GiB: lower batch_size, "
            "prefetch_factor or num_workers"
        )


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def dtype_bytes(embedding_dtype: str) -> int:
    return 2 if embedding_dtype == "float16" else 4


def artifact_bytes(images: int, dim: int, dtype_bytes: int) -> int:
    """The artifact's size: the embeddings plus the metadata and locators."""
    return images * (dim * dtype_bytes + META_BYTES_PER_IMAGE)


def estimate_bytes(images: int, dim: int, dtype_bytes: int) -> int:
    """What a run over ``images`` images writes: the artifact, and the embeddings once more in the stores."""
    return artifact_bytes(images, dim, dtype_bytes) + images * dim * dtype_bytes


def _bytes_under(*paths: Path) -> int:
    total = 0
    for root in paths:
        if root.is_file():
            total += root.stat().st_size
        elif root.is_dir():
            total += sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return total


def bytes_still_needed(
    cfg: DataConfig, layout: Any, dim: int, archive_sizes: list[int] | None = None, expected: int = 0
) -> int:
    """An estimate of what the run writes (from the archives' sizes), less what is already there."""
    return _still_needed(cfg, layout, dim, archive_sizes, expected)[0]


def _still_needed(
    cfg: DataConfig, layout: Any, dim: int, archive_sizes: list[int] | None, expected: int
) -> tuple[int, int, int]:
    """(bytes still to write, images, archive bytes) of bytes_still_needed."""
    from .sources import list_sources

    if archive_sizes is None:
        archive_sizes = [s.path.stat().st_size for s in list_sources(cfg.input_dir) if s.kind == "tar"]
    archive_bytes = sum(archive_sizes)
    if archive_sizes and expected > len(archive_sizes):
        archive_bytes = archive_bytes * expected // len(archive_sizes)
    images = archive_bytes // ARCHIVE_BYTES_PER_IMAGE
    need = estimate_bytes(images, dim, dtype_bytes(cfg.embedding_dtype))
    return need - _bytes_under(layout.work, layout.output), images, archive_bytes


def check_disk_space_for(
    cfg: DataConfig, layout: Any, dim: int, archive_sizes: list[int] | None = None, expected: int = 0
) -> None:
    """Free space where the run writes against an estimate of what it writes, less what is already there.
    The image count comes from the archives' sizes (the index does not exist yet): those in input_dir, or
    ``archive_sizes``; where ``expected`` archives are due and fewer are here (follow mode: a download is
    running), their average stands for the rest."""
    need, images, archive_bytes = _still_needed(cfg, layout, dim, archive_sizes, expected)
    free = min(free_bytes(layout.output.parent), free_bytes(layout.work))
    if need > free:
        raise ConfigError(
            f"{layout.output.parent}: {free / 1e9:.3f} GB free, the run writes about {need / 1e9:.3f} GB "
            f"more (~{images} images x {dim} features, estimated from {archive_bytes / 1e9:.3f} GB of "
            "archives); free space, or point data.hdf5_path / data.work_dir elsewhere"
        )


def check_artifact_space(path: Path, partial: Path, images: int, dim: int, embedding_dtype: str) -> None:
    """Before the artifact is written (any mode, the merge included): its size is known exactly now."""
    need = artifact_bytes(images, dim, dtype_bytes(embedding_dtype))
    if partial.exists():
        need -= partial.stat().st_size
    free = free_bytes(path.parent)
    if need > free:
        raise ConfigError(
            f"{path.parent}: {free / 1e9:.3f} GB free, the artifact needs about {need / 1e9:.3f} GB more "
            f"({images} images x {dim} features); free space and run again (nothing done is lost)"
        )


# ------------------------------------------------------------------------------------------------ device
def driver_version() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9.]+)", text)
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "none found"


def check_cuda() -> dict[str, str]:
    """A bf16 matmul on the GPU; BackboneError naming both versions when CUDA is not usable."""
    import torch

    versions = {
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "driver": driver_version(),
    }
    what = "NVIDIA driver {driver}, torch {torch} built for CUDA {torch_cuda}".format(**versions)
    if torch.version.cuda is None:
        raise BackboneError(f"data.device: cuda, but this torch is a CPU build ({what})")
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False")
        a = torch.ones((64, 64), device="cuda", dtype=torch.bfloat16)
        if float((a @ a)[0, 0]) != 64.0:
            raise RuntimeError("a bf16 matmul gave a wrong result")
        torch.cuda.synchronize()
    except Exception as exc:
        raise BackboneError(f"data.device: CUDA is not usable: {exc} ({what})") from None
    versions["gpu"] = torch.cuda.get_device_name(0)
    return versions


def resolve_device(cfg: DataConfig) -> tuple[str, dict[str, str]]:
    import torch

    if cfg.device == "cpu":
        return "cpu", {"torch": torch.__version__}
    if cfg.device == "cuda":
        return "cuda", check_cuda()
    try:
        return "cuda", check_cuda()
    except BackboneError as exc:
        log.info("data.device: auto: using the CPU (%s)", exc)
        return "cpu", {"torch": torch.__version__}


def resolve_precision(name: str, device: str) -> str:
    if name != "auto":
        return name
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


# --------------------------------------------------------------------------------------- compile toolchain
def compile_toolchain_missing(include_dir: str | Path | None = None) -> list[str]:
    """What torch.compile needs and this machine lacks: Python.h of the running interpreter (Debian's python3
    has none without python3-dev) and a C compiler."""
    import sysconfig

    include = Path(include_dir if include_dir is not None else sysconfig.get_paths()["include"])
    missing = []
    if not (include / "Python.h").is_file():
        missing.append(f"{include / 'Python.h'} (Debian: python3-dev)")
    if not (shutil.which("gcc") or shutil.which("cc")):
        missing.append("a C compiler (Debian: gcc)")
    return missing


def check_compile(cfg: DataConfig, include_dir: str | Path | None = None) -> None:
    if not cfg.compile:
        return
    missing = compile_toolchain_missing(include_dir)
    if missing:
        raise ConfigError(
            f"data.compile: true needs {' and '.join(missing)}: torch.compile (triton, inductor) builds C "
            "helpers with them; install them (the VM's system step does), or set compile: false"
        )


# ------------------------------------------------------------------------------------------------- model
def check_model_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    arch = name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise BackboneError(f"data.feature_model: timm knows no model {name!r}{hint}")


def read_safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON): proof it is one."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if not 2 <= length <= 100_000_000:
                raise ValueError(f"header length {length}")
            header = json.loads(fh.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a mapping")
        return header
    except (OSError, ValueError, struct.error) as exc:
        raise BackboneError(f"data.weights_path: {path}: not a readable safetensors file ({exc})") from None


def _hub_weights(model: str) -> str:
    """The hub's model.safetensors of ``model``: from the cache, else fetched now; BackboneError at once
    when neither works (no minute of retries after the index has run)."""
    import huggingface_hub as hub
    import timm

    pcfg = timm.get_pretrained_cfg(model)
    hub_id = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
    if not hub_id:
        raise BackboneError(
            f"data.feature_model: timm knows no hub weights for {model!r}; set data.weights_path to a local "
            ".safetensors file, or pretrained: false for random weights"
        )
    cached = hub.try_to_load_from_cache(hub_id, "model.safetensors")
    if isinstance(cached, str):
        return cached
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    advice = "set data.weights_path to a local .safetensors file, or restore network access to the hub"
    if offline:
        raise BackboneError(f"{model}: HF_HUB_OFFLINE is set and {hub_id} is not in the hub cache; {advice}")
    try:
        hub.get_hf_file_metadata(hub.hf_hub_url(hub_id, "model.safetensors"), timeout=10)
    except Exception as exc:
        raise BackboneError(
            f"{model}: cannot get {hub_id}/model.safetensors from the hub ({type(exc).__name__}: "
            f"{str(exc)[:200]}); {advice}"
        ) from None
    try:
        return hub.hf_hub_download(hub_id, "model.safetensors")
    except Exception as exc:
        raise BackboneError(f"{model}: fetching {hub_id}/model.safetensors failed: {exc}; {advice}") from None


def weights_digest(path: str) -> str:
    """The hub cache names a file's blob by its SHA-256; a local file is hashed."""
    blob = Path(os.path.realpath(path)).name
    return f"sha256:{blob if re.fullmatch(r'[0-9a-f]{64}', blob) else file_sha256(path)}"


def model_kwargs(cfg: DataConfig) -> dict[str, Any]:
    """timm.create_model's keyword arguments for this config (shared with backbone.load)."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0}
    pcfg = timm.get_pretrained_cfg(cfg.feature_model)
    if cfg.image_size is not None and pcfg is not None and getattr(pcfg, "fixed_input_size", False):
        kwargs["img_size"] = cfg.image_size  # ViTs: resample the position embeddings to this size
    return kwargs


def _meta_model(name: str, **kwargs: Any) -> Any:
    """A weightless copy of a timm model on torch's meta device: its configuration, no memory, no download."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def embedding_width(model: Any) -> int:
    """What the model returns with ``num_classes=0``: its pre-logits width, which is ``num_features`` except
    for models with a head of their own (MobileNetV3: 960 features, 1280 after its head)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def model_skeleton(cfg: DataConfig) -> tuple[dict[str, Any], Any]:
    """The model's data configuration and its weightless copy on torch's meta device."""
    from timm.data import resolve_model_data_config

    try:
        model = _meta_model(cfg.feature_model, **model_kwargs(cfg))
    except Exception as exc:
        raise BackboneError(f"data.feature_model: {cfg.feature_model}: cannot be created: {exc}") from None
    data_config = dict(resolve_model_data_config(model))
    if cfg.image_size is not None:
        data_config["input_size"] = (3, cfg.image_size, cfg.image_size)
    if data_config.get("crop_mode", "center") != "center":
        raise BackboneError(
            f"data.feature_model: {cfg.feature_model}: crop_mode {data_config['crop_mode']!r} is not "
            "supported (only center crops)"
        )
    return data_config, model


def trainer_mismatch(cfg: DataConfig, model: Any) -> str | None:
    """Where the trainer's `model:` section would size its head for another width than the embeddings'
    (it does not read the artifact's backbone_output_size), what to set instead; None where it agrees."""
    trainer = cfg.trainer
    if trainer is None:
        return None
    width = embedding_width(model)
    if trainer.backbone_output_size is not None:
        expected, source = trainer.backbone_output_size, "model.backbone_output_size"
    else:
        source = f"model.backbone {trainer.backbone}: its num_features, model.backbone_output_size being null"
        if trainer.backbone == cfg.feature_model:
            expected = int(model.num_features)
        else:
            try:
                expected = int(_meta_model(trainer.backbone, num_classes=0).num_features)
            except Exception as exc:
                return (
                    f"model.backbone: {trainer.backbone} is not a model timm can create ({exc}); the trainer "
                    f"needs model.backbone_output_size: {width} for these embeddings"
                )
    if expected == width:
        return None
    return (
        f"the trainer's config gives {expected} features ({source}) but {cfg.feature_model} embeds {width}: "
        f"set model.backbone_output_size: {width} in the trainer's config, or the trainer fails on its "
        "first batch (this processor never writes to the config)"
    )


def resolve(cfg: DataConfig, fetch_weights: bool = True) -> Resolved:
    """Device, model, weights and identity, or the first error (BackboneError, exit 6; ConfigError, exit 2).
    ``fetch_weights=False`` (the VM's preflight: the forward pass runs the same kernels with any weights)
    resolves random weights instead of finding or fetching the configured ones."""
    check_compile(cfg)
    check_model_name(cfg.feature_model)
    # The device before the weights: a broken GPU fails now, not after a download of the weights.
    device, versions = resolve_device(cfg)
    if cfg.pretrained and fetch_weights:
        if cfg.weights_path:
            if not Path(cfg.weights_path).is_file():
                raise BackboneError(f"data.weights_path: {cfg.weights_path}: no such file")
            read_safetensors_header(cfg.weights_path)
            weights_file: str | None = cfg.weights_path
        else:
            weights_file = _hub_weights(cfg.feature_model)
        weights = weights_digest(weights_file)
    else:
        weights_file, weights = None, RANDOM_WEIGHTS
    precision = resolve_precision(cfg.precision, device)
    data_config, model = model_skeleton(cfg)
    identity = ModelIdentity(
        model=cfg.feature_model,
        weights=weights,
        input_size=tuple(int(v) for v in data_config["input_size"]),  # type: ignore[arg-type]
        interpolation=str(data_config.get("interpolation", "bicubic")),
        crop_pct=float(data_config.get("crop_pct") or 1.0),
        mean=tuple(float(v) for v in data_config["mean"]),
        std=tuple(float(v) for v in data_config["std"]),
        fast_decode=cfg.fast_decode,
        precision=precision,
        device_type=device,
        embedding_dtype=cfg.embedding_dtype,
    )
    note = trainer_mismatch(cfg, model)
    width = embedding_width(model)
    return Resolved(device, precision, weights_file, identity, width, versions, (note,) if note else ())
