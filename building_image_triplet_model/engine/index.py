"""Step 1: the index. One sequential pass over each source, sources in parallel processes.

Each source gives an immutable shard ``index/<source>.npz`` (every ``d`` field, the image locator, the
checksum of every image's bytes, the rejects) and its marker ``index/<source>.json`` (signature, digests,
counts) written after it. Reading every member's bytes costs little more than the headers: an archive is
read sequentially either way, and hashing (SHA-256, ~1.4 GB/s per core) is faster than any disk of the VM.
The merged ``metadata_cache_complete.npz`` is rebuilt only when a source's digest changed.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import numpy as np

from building_image_triplet_model.errors import InputError
from building_image_triplet_model.inputs import records
from building_image_triplet_model.inputs.records import D_FIELDS, FIELD_DTYPES, REASON_CODE, RejectError
from building_image_triplet_model.inputs.sources import Source, stem_of, walk
from building_image_triplet_model.io import durable, faults, workdir
from building_image_triplet_model.io.workdir import INDEX_VERSION, Layout

log = logging.getLogger(__name__)

LOCATOR_COLUMNS = ("stem", "path", "offset", "size", "checksum")
COLUMNS = LOCATOR_COLUMNS + D_FIELDS
REJECT_COLUMNS = ("rej_path", "rej_reason", "rej_detail")
SHARD_COLUMNS = COLUMNS + REJECT_COLUMNS
MADE_FOR = "made_for"  # in a shard: [source, content key, index version]
CACHE_COLUMNS = (*COLUMNS, *REJECT_COLUMNS, "source_idx", "rej_source_idx", "source_names", "source_digests")


def _bytes_array(values: list[str]) -> np.ndarray:
    encoded = [v.encode("utf-8", "surrogateescape") for v in values]
    return np.array(encoded, dtype=f"S{max((len(v) for v in encoded), default=1) or 1}")


def digest_arrays(arrays: dict[str, np.ndarray], keys: tuple[str, ...] | None = None) -> str:
    """A content digest that does not depend on how the file was written."""
    h = hashlib.sha256()
    for key in sorted(keys or arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def content_key(arrays: dict[str, np.ndarray]) -> str:
    """The archive's content key (identity.py): its images, row by row, by stem, size and checksum."""
    return digest_arrays(arrays, ("stem", "size", "checksum"))[:16]


def build_source_index(source: Source, record_bytes: int) -> tuple[dict[str, np.ndarray], list[tuple]]:
    """Walk one source: pair images and metadata by stem, parse, and sort the good pairs by stem."""
    jpgs: dict[str, list[Any]] = {}
    txts: dict[str, list[Any]] = {}
    rejects: list[tuple[str, str, str]] = []
    for m in walk(source, record_bytes):
        if m.kind == "irregular":
            rejects.append((m.path, "not_a_regular_file", ""))
        elif m.kind == "other":
            rejects.append((m.path, "unrecognized_file", ""))
        elif m.kind == "jpg":
            jpgs.setdefault(stem_of(m.path), []).append((m.path, m.offset, m.size, m.checksum))
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
        (jpg_path, offset, size, checksum), (txt_path, parsed) = js[0], ts[0]
        if size == 0:
            rejects.append((jpg_path, "empty_image", ""))
            continue
        if checksum is None:
            rejects.append((jpg_path, "unreadable_image", ""))
            continue
        if isinstance(parsed, RejectError):
            rejects.append((txt_path, parsed.reason, parsed.detail))
            continue
        *ids, floats = parsed
        for name, value in zip(LOCATOR_COLUMNS, (stem, jpg_path, offset, size, checksum), strict=True):
            cols[name].append(value)
        for name, value in zip(D_FIELDS, (*ids, *floats), strict=True):
            cols[name].append(value)
    arrays: dict[str, np.ndarray] = {
        "stem": _bytes_array(cols["stem"]),
        "path": _bytes_array(cols["path"]),
        "offset": np.array(cols["offset"], np.int64),
        "size": np.array(cols["size"], np.int64),
        "checksum": np.array(cols["checksum"], np.int64),
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


def index_source(source: Source, layout: Layout, record_bytes: int) -> dict[str, Any]:
    """Index one source into its shard and marker; returns the marker. Runs in a worker process."""
    t0 = time.monotonic()
    signature = source.signature()
    arrays, rejects = build_source_index(source, record_bytes)
    digest, content = digest_arrays(arrays, SHARD_COLUMNS), content_key(arrays)
    durable.write_npz(layout.shard(source.name), {**arrays, MADE_FOR: made_for(source.name, content)})
    keys = records.target_key(arrays["DatasetID"], arrays["TargetID"])
    marker = {
        "version": INDEX_VERSION,
        "source": source.name,
        "kind": source.kind,
        "signature": signature,
        "digest": digest,
        "content": content,
        "images": len(arrays["stem"]),
        "image_bytes": int(arrays["size"].sum()),
        "targets": len(np.unique(keys)),
        "rejects": dict(sorted(Counter(r[1] for r in rejects).items())),
        "seconds": round(time.monotonic() - t0, 3),
    }
    workdir.commit(layout.shard_marker(source.name), marker)
    return marker


def _worker_init() -> None:
    # A stop request is the parent's to handle (it terminates us); a SIGTERM to the whole group (systemd,
    # preemption) ends a worker at once: its shard is only ever renamed into place when complete.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def index_all(
    sources: list[Source],
    layout: Layout,
    workers: int,
    record_bytes: int,
    stop: threading.Event,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Index every source that has no valid shard yet, in parallel. Returns the markers by source name.

    An unreadable archive does not stop the others: every other source is indexed (and kept), then an
    InputError lists the bad archives.
    """
    markers: dict[str, dict[str, Any]] = {}
    todo = []
    for src in sources:
        marker = layout.index_marker(src.name, src.signature())
        if marker:
            markers[src.name] = marker
        else:
            todo.append(src)
    if not todo:
        return markers
    n_proc = max(1, min(workers, len(todo)))
    log.info("indexing %d of %d sources with %d processes", len(todo), len(sources), n_proc)
    errors: list[str] = []
    # fork: workers need only what is already imported (numpy), start in milliseconds, and the caller's
    # script is not re-imported (spawn would re-run a script that lacks a __main__ guard).
    pool = ProcessPoolExecutor(
        max_workers=n_proc, mp_context=mp.get_context("fork"), initializer=_worker_init
    )
    pending: dict[Future[dict[str, Any]], Source] = {}
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < n_proc * 2:
                src = queue.pop(0)
                pending[pool.submit(index_source, src, layout, record_bytes)] = src
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            if stop.is_set():
                break
            for fut in done:
                src = pending.pop(fut)
                try:
                    marker = fut.result()
                except InputError as exc:
                    errors.append(str(exc))
                    log.error("input error: %s", exc)
                    continue
                markers[src.name] = marker
                faults.point("index.source_done")
                log.info(
                    "indexed %s: %d images, %d targets, %d rejected in %.1fs",
                    src.name,
                    marker["images"],
                    marker["targets"],
                    sum(marker["rejects"].values()),
                    marker["seconds"],
                )
                if on_done:
                    on_done(marker)
    finally:
        if stop.is_set():
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
        pool.shutdown(wait=not stop.is_set(), cancel_futures=True)
    if errors and not stop.is_set():
        raise InputError("; ".join(errors))
    return markers


def made_for(name: str, content: str) -> np.ndarray:
    return np.array([name.encode(), content.encode(), str(INDEX_VERSION).encode()], dtype="S")


def load_shard(
    layout: Layout, name: str, marker: dict[str, Any], lazy: bool = False
) -> dict[str, np.ndarray] | durable.LazyNpz:
    """A source's shard, checked against its marker and the name it is used for: the marker must be the
    source's, and the shard must say it was made for that source, content and index version. A shard of an
    earlier release (no keys inside) is proven by the marker's digest of every column, then written again
    with its keys. Anything else is a CorruptFileError naming the file (moved aside and indexed again)."""
    if marker.get("source") != name or marker.get("version") != INDEX_VERSION:
        raise durable.CorruptFileError(
            layout.shard_marker(name),
            f"the marker of archive {marker.get('source')!r} (index version {marker.get('version')}), "
            f"not of {name!r} (version {INDEX_VERSION})",
        )
    path = layout.shard(name)
    shard = durable.LazyNpz(path, SHARD_COLUMNS)
    expected = made_for(name, str(marker.get("content")))
    if MADE_FOR in shard:
        if shard[MADE_FOR].tolist() != expected.tolist():
            found = [v.decode(errors="replace") for v in shard[MADE_FOR].tolist()]
            raise durable.CorruptFileError(
                path,
                f"made for archive, content key, index version {found}, not {expected.astype(str).tolist()}",
            )
        return shard if lazy else {c: shard[c] for c in SHARD_COLUMNS}
    arrays = {c: shard[c] for c in SHARD_COLUMNS}
    if digest_arrays(arrays, SHARD_COLUMNS) != marker.get("digest"):
        raise durable.CorruptFileError(path, f"does not hold what the marker of archive {name} describes")
    durable.write_npz(path, {**arrays, MADE_FOR: expected})
    log.info("%s: an index shard of an earlier release, proven by its marker's digest; now keyed", path)
    return arrays


def merge_cache(layout: Layout, names: list[str], markers: dict[str, dict[str, Any]]) -> None:
    """Write ``metadata_cache_complete.npz``: every source's rows, in source order, rows sorted by stem."""
    wanted = [markers[n]["digest"] for n in names]
    if read_cache_header(layout) == (names, wanted):
        return
    shards = [load_shard(layout, n, markers[n]) for n in names]
    out: dict[str, np.ndarray] = {}
    for col in SHARD_COLUMNS:
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
    durable.write_npz(layout.cache, out)


def read_cache_header(layout: Layout) -> tuple[list[str], list[str]] | None:
    """(source names, shard digests) of an existing merged cache, or None (absent or unreadable: the
    cache is rebuilt from the shards, so a damaged one needs no quarantine)."""
    if not layout.cache.exists():
        return None
    try:
        head = durable.read_npz(layout.cache, ("source_names", "source_digests"))
    except durable.CorruptFileError:
        return None
    return [n.decode() for n in head["source_names"]], [d.decode() for d in head["source_digests"]]


def load_cache(layout: Layout) -> durable.LazyNpz:
    """The merged index; columns are read from disk when first used."""
    return durable.LazyNpz(layout.cache, CACHE_COLUMNS)


def upload_cache(layout: Layout, uri: str) -> None:
    """Copy the finished cache to METADATA_CACHE_SYNC_URI: a gs:// URI or a local path, either naming the
    object itself (ending in .npz) or the folder it goes into."""
    from building_image_triplet_model.remote import cloud_sync

    target = uri if uri.endswith(".npz") else uri.rstrip("/") + "/" + layout.cache.name
    cloud_sync.upload_file(layout.cache, target)
    log.info("uploaded the metadata cache to %s", target)
