"""One object at a time: upload, download, exists, stat, read, create-only write, and listing a location."""

from __future__ import annotations

import io
import os
import time
from dataclasses import replace
from pathlib import Path

from building_image_triplet_model.remote.cloud_sync.locations import ObjectInfo, open_location, open_object
from building_image_triplet_model.remote.cloud_sync.sync import list_folder, rel_of


def upload_file(
    local: str | os.PathLike[str], uri: str, *, if_generation_match: int | None = None
) -> ObjectInfo:
    """Upload one file to ``uri`` (an object name, or a folder when it ends with '/'), verified by CRC32C.
    ``if_generation_match=0``: only when the object does not exist yet (else :class:`FileExistsError`)."""
    path = Path(local)
    store, key = open_object(uri + path.name if uri.endswith("/") else uri)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        return store.upload(f, key, st.st_size, st.st_mtime_ns, if_generation_match)


def download_file(uri: str, local: str | os.PathLike[str]) -> ObjectInfo:
    """Download one object to ``local`` (a file path, or a folder when it ends with '/' or is a folder)."""
    store, key = open_object(uri)
    dest = Path(local)
    if os.fspath(local).endswith("/") or dest.is_dir():
        dest = dest / key.rsplit("/", 1)[-1]
    return store.download(key, dest)


def exists(uri: str) -> bool:
    """True when ``uri`` names an object (or file), or a folder prefix holding at least one object."""
    store, key = open_location(uri)
    return bool(key and store.stat(key)) or store.has_objects(f"{key}/" if key else "")


def stat(uri: str) -> ObjectInfo | None:
    """The object's size, CRC32C (local: not computed) and recorded mtime, or None."""
    store, key = open_object(uri)
    return store.stat(key)


def read_text(uri: str, encoding: str = "utf-8") -> str:
    """The content of one object; :class:`FileNotFoundError` when it does not exist."""
    store, key = open_object(uri)
    return store.read_bytes(key).decode(encoding)


def write_text(
    uri: str, text: str, *, if_generation_match: int | None = None, encoding: str = "utf-8"
) -> ObjectInfo:
    """Write one object atomically. ``if_generation_match=0`` creates it only if it does not exist yet and
    raises :class:`FileExistsError` otherwise (a create-only lock or claim)."""
    store, key = open_object(uri)
    data = text.encode(encoding)
    return store.upload(io.BytesIO(data), key, len(data), time.time_ns(), if_generation_match)


def list_objects(uri: str) -> list[ObjectInfo]:
    """Every object under a folder location (keys relative to it), or the one object it names."""
    store, prefix = open_location(uri)
    out = [replace(i, key=rel_of(prefix, k)) for k, i in sorted(list_folder(store, prefix).items())]
    if not out and (info := stat(uri)) is not None:
        out.append(replace(info, key=info.key.rsplit("/", 1)[-1]))
    return out
