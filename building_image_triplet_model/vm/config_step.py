"""The bootstrap's config step: settings, the manifest and the preprocess YAML, checked before anything
long starts, and stored under the config folder for every later step.

    <config>/settings.json     every setting, typed, plus what follows from them (task, intervals, paths)
    <config>/manifest.txt      the run's aria2c manifest (fetched from gs:// or copied from the repository)
    <config>/preprocess.yaml   the preprocess YAML as the engine reads it

The YAML is the first of: TRIPLET_PREPROCESS_CONFIG_FILE (a file), the metadata key
triplet-preprocess-config (YAML text), triplet-preprocess-config-uri, triplet-preprocess-config-path (in the
repository). The bootstrap owns three of its keys (unless TRIPLET_OVERRIDE_PATHS=0): data.input_dir (the
raw disk's archives, or the extracted folder), data.hdf5_path (on the work disk, the YAML's file name) and
data.manifest (the copy above). It is read and parsed by the engine's own reader (config.read_text and
config.parse_yaml: UTF-8, bounded in size and in what its aliases expand to) and checked by its loader.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from building_image_triplet_model.inputs import manifest
from building_image_triplet_model.io import durable
from building_image_triplet_model.io.workdir import Layout

from .. import config as engine_config
from . import settings as vm_settings
from .paths import VMPaths

log = logging.getLogger(__name__)

MAX_YAML_BYTES = engine_config.MAX_CONFIG_BYTES


class ConfigStepError(RuntimeError):
    pass


def _task(mode: str, env: Mapping[str, str]) -> dict[str, int]:
    if mode != "worker":
        return {}
    i, n = (
        env.get("TASK_INDEX", env.get("BATCH_TASK_INDEX", "")),
        env.get("TASK_COUNT", env.get("BATCH_TASK_COUNT", "")),
    )
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise ConfigStepError(
            "mode worker needs TASK_INDEX < TASK_COUNT (or BATCH_TASK_INDEX/BATCH_TASK_COUNT)"
        )
    return {"task-index": int(i), "task-count": int(n)}


def _fetch(uri: str, dest: Path, repo: Path) -> None:
    if uri.startswith("gs://"):
        from building_image_triplet_model.remote import cloud_sync

        cloud_sync.download_file(uri, dest)
        return
    src = Path(uri) if uri.startswith("/") else repo / uri
    if not src.is_file():
        raise ConfigStepError(f"{src} not found")
    with durable.atomic_open(dest) as fh, open(src, "rb") as inp:
        shutil.copyfileobj(inp, fh)


def _preprocess_yaml(
    s: dict[str, Any], env: Mapping[str, str], paths: VMPaths, md: vm_settings.Metadata
) -> tuple[str, str]:
    """(YAML text, where it came from)."""
    if env.get("TRIPLET_PREPROCESS_CONFIG_FILE"):
        src = env["TRIPLET_PREPROCESS_CONFIG_FILE"]
        return _read(src), src
    if s["preprocess-config"]:
        return s["preprocess-config"], "metadata triplet-preprocess-config"
    if s["preprocess-config-uri"]:
        tmp = paths.config_dir / "raw" / "preprocess-config.yaml"
        _fetch(s["preprocess-config-uri"], tmp, paths.repo_dir)
        return _read(tmp), s["preprocess-config-uri"]
    src = (
        paths.repo_dir / s["preprocess-config-path"]
        if not s["preprocess-config-path"].startswith("/")
        else Path(s["preprocess-config-path"])
    )
    if not src.is_file():
        raise ConfigStepError(f"preprocess config {src} not found")
    return _read(src), str(src)


def _read(path: str | Path) -> str:
    try:
        return engine_config.read_text(path)
    except engine_config.ConfigError as exc:
        raise ConfigStepError(str(exc)) from None


def effective_yaml(
    text: str, where: str, paths: VMPaths, extract: bool, manifest_copy: Path, override: bool
) -> str:
    if len(text.encode()) > MAX_YAML_BYTES:
        raise ConfigStepError(f"{where}: larger than {MAX_YAML_BYTES} bytes")
    try:
        doc = engine_config.parse_yaml(text, where)
    except engine_config.ConfigError as exc:
        raise ConfigStepError(str(exc)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise ConfigStepError(f"{where}: must be a mapping with a 'data:' section")
    if doc["data"].get("embeddings_dir") is not None:
        # One VM builds one output, and its checkpoints carry the work folder: a shared folder outside it
        # would not survive a preemption. Sharing embeddings is for outputs built on one machine's disk.
        raise ConfigStepError(
            f"{where}: data.embeddings_dir is not supported on the VM (its checkpoints carry the work folder "
            "only, so embeddings outside it would be lost with the VM): remove the key"
        )
    if override:
        data = doc["data"]
        name = Path(str(data.get("hdf5_path") or "dataset.h5")).name
        if not re.fullmatch(r"[A-Za-z0-9._-]+\.(h5|hdf5)", name):
            raise ConfigStepError(f"{where}: data.hdf5_path must end in a plain .h5 file name")
        data["input_dir"] = str(paths.extract_dir if extract else paths.archive_dir)
        data["hdf5_path"] = str(paths.output_dir / name)
        data["manifest"] = str(manifest_copy)
    weights = doc["data"].get("weights_path")
    if isinstance(weights, str) and weights.startswith("gs://"):
        doc["data"]["weights_path"] = str(local_weights(weights, paths, where))
    return f"# written by the bootstrap's config step from {where}\n" + yaml.safe_dump(doc, sort_keys=False)


def local_weights(uri: str, paths: VMPaths, where: str) -> Path:
    """data.weights_path in the bucket (put there once by ``triplet-weights``):
    downloaded to the work disk once, CRC32C-checked, so that no worker asks the hub; the engine loads the
    local file, and the model key (the weights' SHA-256) is the one the hub's file gives."""
    from building_image_triplet_model.remote import cloud_sync

    parts = uri.removeprefix("gs://").split("/")
    name_ok = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
    if (
        len(parts) < 3
        or not all(name_ok.fullmatch(p) for p in parts[-2:])
        or not parts[-1].endswith(".safetensors")
    ):
        raise ConfigStepError(f"{where}: data.weights_path {uri!r} must name a .safetensors object")
    dest = paths.config_dir / "weights" / parts[-2] / parts[-1]
    try:
        info = cloud_sync.stat(uri)
        if info is None:
            raise ConfigStepError(f"{where}: data.weights_path {uri} does not exist")
        if not (
            dest.is_file()
            and dest.stat().st_size == info.size
            and cloud_sync.crc32c_of_file(dest) == info.crc32c
        ):
            dest.parent.mkdir(parents=True, exist_ok=True)
            cloud_sync.download_file(uri, dest)  # verified by CRC32C as it arrives; renamed into place
            log.info("config: weights %s downloaded to %s (%d bytes)", uri, dest, info.size)
    except cloud_sync.CloudSyncError as exc:
        raise ConfigStepError(f"{where}: data.weights_path {uri}: {exc}") from None
    return dest


def run(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Resolve, check and store everything; returns the stored settings."""
    env = os.environ if env is None else env
    paths = VMPaths.from_env(env)
    md = vm_settings.metadata_from_env(env)
    s, notes = vm_settings.resolve_all(env, md)
    for note in notes:
        log.warning("%s", note)
    if not s["run-id"]:
        name = md.get("instance/name") if md.mode != "off" else None
        s["run-id"] = name if name and re.fullmatch(vm_settings.RUN_ID, name) else "local"
    s.update(_task(s["mode"], env))
    s["checkpoint-uri"] = s["checkpoint-uri"].rstrip("/")
    if not s["checkpoint-uri"] and s["mode"] != "single":
        raise ConfigStepError(f"mode {s['mode']} needs a checkpoint-uri (the run's shards live there)")
    if not s["output-uri"] and s["checkpoint-uri"]:
        s["output-uri"] = f"{s['checkpoint-uri']}/{s['run-id']}/artifact"
    seconds = env.get("TRIPLET_PUSH_INTERVAL_S")
    if seconds is not None and not (seconds.isdigit() and int(seconds) <= 864000):
        raise ConfigStepError("TRIPLET_PUSH_INTERVAL_S: seconds, 0 to 864000")
    s["push-interval-s"] = int(seconds) if seconds is not None else s["push-interval-min"] * 60
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    copy = paths.config_dir / "manifest.txt"
    try:
        _fetch(s["manifest-uri"], copy, paths.repo_dir)
        manifest.load(copy, paths.repo_dir)
    except (OSError, manifest.ManifestError) as exc:
        raise ConfigStepError(f"the manifest {s['manifest-uri']}: {exc}") from None
    text, where = _preprocess_yaml(s, env, paths, md)
    override = env.get("TRIPLET_OVERRIDE_PATHS", "1") != "0"
    eff = paths.config_dir / "preprocess.yaml"
    durable.write_bytes(
        eff, effective_yaml(text, where, paths, s["extract-archives"], copy, override).encode()
    )
    try:
        cfg = engine_config.load(eff)
    except engine_config.ConfigError as exc:
        raise ConfigStepError(f"the engine refuses {where}: {exc}") from None
    for note in cfg.warnings:  # said at boot, in the startup's log, not only hours later in the job's
        log.warning("config: %s: %s", where, note)
    layout = Layout(cfg)
    s["engine"] = {
        "config": str(eff),
        "output": str(layout.output),
        "work": str(layout.work),
        "log": str(layout.log),
        "rejects": str(layout.rejects),
        "stats": str(layout.stats),
    }
    s["preprocess-config-from"] = where
    durable.write_json(paths.config_dir / "settings.json", s)
    log.info(
        "config: mode=%s run-id=%s checkpoint-uri=%s output-uri=%s extract=%s on-done=%s push every %ds, "
        "config from %s",
        s["mode"],
        s["run-id"],
        s["checkpoint-uri"] or "<none>",
        s["output-uri"] or "<none>",
        str(s["extract-archives"]).lower(),
        s["on-done"],
        s["push-interval-s"],
        where,
    )
    if not s["checkpoint-uri"]:
        log.warning("config: no checkpoint-uri: nothing survives the loss of the work disk")
    return s
