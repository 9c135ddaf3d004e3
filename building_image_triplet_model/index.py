"""Step 1: the index. One sequential pass over each source, sources in parallel processes.

Each source gives an immutable shard ``index/<source>.npz`` (every ``d`` field, the image locator, the
rejects) and its marker ``index/<source>.json`` (signature, content digest, counts) written after it. The
merged ``metadata_cache_complete.npz`` is rebuilt only when a source's signature (name, size, mtime) changed.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from . import faults, records, workdir
from .records import D_FIELDS, FIELD_DTYPES, REASON_CODE, REJECT_REASONS, RejectError
from .sources import InputError, Source, stem_of, walk

log = logging.getLogger(__name__)

INDEX_VERSION = 1
CACHE_NAME = "metadata_cache_complete.npz"
LOCATOR_COLUMNS = ("stem", "path", "offset", "size")
COLUMNS = LOCATOR_COLUMNS + D_FIELDS
REJECT_COLUMNS = ("rej_path", "rej_reason", "rej_detail")


def shard_paths(work: Path, name: str) -> tuple[Path, Path]:
    return work / "index" / f"{name}.npz", work / "index" / f"{name}.json"


def _bytes_array(values: list[str]) -> np.ndarray:
    encoded = [v.encode("utf-8", "surrogateescape") for v in values]
    return np.array(encoded, dtype=f"S{max((len(v) for v in encoded), default=1) or 1}")


def digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    """A content digest that does not depend on how the file was written."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def build_source_index(source: Source) -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
    """Walk one source: pair images and metadata by stem, parse, and sort the good pairs by stem."""
    jpgs: dict[str, list[Any]] = {}
    txts: dict[str, list[Any]] = {}
    rejects: list[tuple[str, str, str]] = []
    for m in walk(source):
        if m.kind == "irregular":
            rejects.append((m.path, "not_a_regular_file", ""))
        elif m.kind == "other":
            rejects.append((m.path, "unrecognized_file", ""))
        elif m.kind == "jpg":
            jpgs.setdefault(stem_of(m.path), []).append((m.path, m.offset, m.size))
        else:
            # Parsed at once: a few numbers stay in memory instead of the text (archives hold ~10^6 members).
            txts.setdefault(stem_of(m.path), []).append((m.path, _parse(m.data, m.size)))
    cols: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for stem in sorted(jpgs.keys() | txts.keys()):
        js, ts = jpgs.get(stem, []), txts.get(stem, [])
        if len(js) > 1 or len(ts) > 1:
            rejects.extend((m[0], "duplicate_stem", f"{len(js)} images, {len(ts)} txt") for m in js + ts)
            continue
        if not ts:
            rejects.append((js[0][0], "orphan_jpg", ""))
            continue
        if not js:
            rejects.append((ts[0][0], "orphan_txt", ""))
            continue
        (jpg_path, offset, size), (txt_path, parsed) = js[0], ts[0]
        if size == 0:
            rejects.append((jpg_path, "empty_image", ""))
            continue
        if isinstance(parsed, RejectError):
            rejects.append((txt_path, parsed.reason, parsed.detail))
            continue
        *ids, floats = parsed
        cols["stem"].append(stem)
        cols["path"].append(jpg_path)
        cols["offset"].append(offset)
        cols["size"].append(size)
        for name, value in zip(D_FIELDS, (*ids, *floats), strict=True):
            cols[name].append(value)
    arrays: dict[str, np.ndarray] = {
        "stem": _bytes_array(cols["stem"]),
        "path": _bytes_array(cols["path"]),
        "offset": np.array(cols["offset"], np.int64),
        "size": np.array(cols["size"], np.int64),
    }
    for name in D_FIELDS:
        arrays[name] = np.array(cols[name], FIELD_DTYPES[name])
    rejects.sort()
    arrays["rej_path"] = _bytes_array([r[0] for r in rejects])
    arrays["rej_reason"] = np.array([REASON_CODE[r[1]] for r in rejects], np.int8)
    arrays["rej_detail"] = _bytes_array([r[2][:200] for r in rejects])
    return arrays, rejects


def _parse(data: bytes | None, size: int) -> tuple | RejectError:
    if data is None:
        return RejectError("unreadable_txt", f"{size} bytes")
    try:
        return records.parse_d_line(data)
    except RejectError as exc:
        return exc


def index_source(source: Source, work: Path) -> dict[str, Any]:
    """Index one source into its shard and marker; returns the marker. Runs in a worker process."""
    t0 = time.monotonic()
    signature = source.signature()
    arrays, rejects = build_source_index(source)
    npz, marker_path = shard_paths(work, source.name)
    workdir.write_npz(npz, arrays)
    keys = records.target_key(arrays["DatasetID"], arrays["TargetID"])
    marker = {
        "version": INDEX_VERSION,
        "source": source.name,
        "kind": source.kind,
        "signature": signature,
        "digest": digest_arrays(arrays),
        "images": len(arrays["stem"]),
        "targets": len(np.unique(keys)),
        "rejects": dict(sorted(Counter(r[1] for r in rejects).items())),
        "seconds": round(time.monotonic() - t0, 3),
    }
    workdir.write_json(marker_path, marker)
    return marker


def cached_marker(source: Source | None, work: Path, name: str) -> dict[str, Any] | None:
    """The marker of a shard that is complete and still matches its source (or has no source here)."""
    npz, marker_path = shard_paths(work, name)
    marker = workdir.read_json(marker_path)
    if not marker or marker.get("version") != INDEX_VERSION or not npz.exists():
        return None
    if source is not None and marker.get("signature") != source.signature():
        return None
    return marker


def _worker_init() -> None:
    # A stop request is the parent's to handle (it terminates us); a SIGTERM to the whole group (systemd,
    # preemption) ends a worker at once: its shard is only ever renamed into place when complete.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def index_all(
    sources: list[Source], work: Path, workers: int, stop: threading.Event, progress: Any = None
) -> dict[str, dict[str, Any]]:
    """Index every source that has no valid shard yet, in parallel. Returns the markers by source name.

    Unreadable archives do not stop the others: every other source is indexed (and kept), then an
    InputError lists the bad archives.
    """
    markers: dict[str, dict[str, Any]] = {}
    todo = []
    for src in sources:
        marker = cached_marker(src, work, src.name)
        if marker:
            markers[src.name] = marker
        else:
            todo.append(src)
    if progress:
        progress.start("index", total=len(sources), done=len(markers), unit="archives")
    if not todo:
        return markers
    log.info("indexing %d of %d sources with %d processes", len(todo), len(sources), min(workers, len(todo)))
    errors: list[str] = []
    # fork: workers need only what is already imported (numpy, tarfile), start in milliseconds, and the
    # caller's script is not re-imported (spawn would re-run a script that lacks a __main__ guard).
    ctx = mp.get_context("fork")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init)
    pending: dict[Future[dict[str, Any]], Source] = {}
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < min(workers, len(todo)) * 2:
                src = queue.pop(0)
                pending[pool.submit(index_source, src, work)] = src
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            if stop.is_set():
                break
            for fut in done:
                src = pending.pop(fut)
                try:
                    marker = fut.result()
                except InputError as exc:
                    errors.append(str(exc))
                    log.error("%s", exc)
                    continue
                markers[src.name] = marker
                faults.point("index.source_done")
                if progress:
                    progress.advance("index", 1, images=marker["images"])
                log.info(
                    "indexed %s: %d images, %d targets, %d rejected in %.1fs",
                    src.name,
                    marker["images"],
                    marker["targets"],
                    sum(marker["rejects"].values()),
                    marker["seconds"],
                )
    finally:
        if stop.is_set():
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
        pool.shutdown(wait=not stop.is_set(), cancel_futures=True)
    if errors and not stop.is_set():
        raise InputError("; ".join(errors))
    return markers


def load_shard(work: Path, name: str, lazy: bool = False) -> dict[str, np.ndarray] | workdir.LazyNpz:
    path = shard_paths(work, name)[0]
    return workdir.LazyNpz(path) if lazy else workdir.read_npz(path)


def merge_cache(work: Path, names: list[str], markers: dict[str, dict[str, Any]]) -> Path:
    """Write ``metadata_cache_complete.npz``: every source's rows, in source order, rows sorted by stem."""
    path = work / CACHE_NAME
    wanted = [markers[n]["digest"] for n in names]
    existing = read_cache_header(path)
    if existing is not None and existing == (names, wanted):
        return path
    shards = [load_shard(work, n) for n in names]
    out: dict[str, np.ndarray] = {}
    for col in COLUMNS + REJECT_COLUMNS:
        parts = [s[col] for s in shards]
        if parts[0].dtype.kind == "S":
            width = max(p.dtype.itemsize for p in parts)
            parts = [p.astype(f"S{width}") for p in parts]
        out[col] = np.concatenate(parts)
    out["source_idx"] = np.concatenate([np.full(len(s["stem"]), i, np.int32) for i, s in enumerate(shards)])
    out["rej_source_idx"] = np.concatenate(
        [np.full(len(s["rej_path"]), i, np.int32) for i, s in enumerate(shards)]
    )
    out["source_names"] = _bytes_array(names)
    out["source_digests"] = _bytes_array(wanted)
    workdir.write_npz(path, out)
    return path


def read_cache_header(path: Path) -> tuple[list[str], list[str]] | None:
    """(source names, shard digests) of an existing merged cache, or None."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [n.decode() for n in data["source_names"]]
            digests = [d.decode() for d in data["source_digests"]]
    except (OSError, KeyError, ValueError):
        return None
    return names, digests


def load_cache(work: Path) -> workdir.LazyNpz:
    """The merged index; columns are read from disk when first used."""
    return workdir.LazyNpz(work / CACHE_NAME)


def reject_reason_names(codes: np.ndarray) -> list[str]:
    return [REJECT_REASONS[int(c)] for c in codes]


def upload_cache(work: Path, uri: str) -> None:
    """Copy the finished cache to METADATA_CACHE_SYNC_URI: a gs:// URI or a local path, either naming the
    object itself (ending in .npz) or the folder it goes into."""
    from . import cloud_sync

    target = uri if uri.endswith(".npz") else uri.rstrip("/") + "/" + CACHE_NAME
    cloud_sync.upload_file(work / CACHE_NAME, target)
    log.info("uploaded the metadata cache to %s", target)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
