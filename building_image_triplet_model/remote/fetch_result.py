"""Bring a finished run home: the artifact, its stats and its rejects file, verified, into a local folder.

    python -m building_image_triplet_model.remote.fetch_result RUN_URI DEST
    gcp/provision.sh fetch [DEST]          # RUN_URI = CHECKPOINT_URI/RUN_ID, DEST = build/results/RUN_ID

RUN_URI is the run's folder in the bucket (``gs://.../checkpoints/run-001``) or a local folder standing in for
it. A run is finished when ``artifact/_SUCCESS.json`` is there (the VM writes it after the artifact's verified
upload); until then nothing is fetched (exit 10, as ``preprocess_resume`` says work remains).

Every file is verified: its CRC32C against the object's (Cloud Storage metadata; google-cloud-storage also
checks the bytes while they arrive), its MD5 against the object's when Cloud Storage has one, the artifact's
size and CRC32C against ``_SUCCESS.json``, and the stats file's ``run_key`` against the artifact's own
attribute (they belong together). Files arrive under a temporary name and are renamed when verified.

A file already in DEST is never overwritten unless this command wrote it and nobody changed it since
(``DEST/.fetched.json`` records what it wrote, with each file's CRC32C): an identical file is kept as it
is; any other is refused, named, and nothing is replaced (exit 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.io import durable
from building_image_triplet_model.remote import cloud_sync
from building_image_triplet_model.remote.cloud_sync.locations import GCSStore, open_object

RECORD = ".fetched.json"
_CHUNK = 8 * 1024 * 1024


class FetchError(Exception):
    def __init__(self, message: str, code: Exit = Exit.ERROR) -> None:
        super().__init__(message)
        self.code = code


def _md5_of(uri: str) -> str | None:
    """The object's MD5 as Cloud Storage reports it (base64), or None (a composite object, a local file)."""
    store, key = open_object(uri)
    if not isinstance(store, GCSStore):
        return None
    blob = store.bucket.get_blob(key)
    return None if blob is None else blob.md5_hash


def _md5_file(path: Path) -> str:
    import base64

    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return base64.b64encode(h.digest()).decode("ascii")


def _wanted(run_uri: str) -> tuple[dict[str, str], dict[str, object]]:
    """{local name: object URI} of the finished run's artifact, stats and rejects, and its _SUCCESS.json."""
    base = run_uri.rstrip("/")
    try:
        success = json.loads(cloud_sync.read_text(f"{base}/artifact/_SUCCESS.json"))
    except FileNotFoundError:
        raise FetchError(
            f"{base}: the run is not finished (no artifact/_SUCCESS.json yet): see gcp/provision.sh status",
            Exit.WORK_REMAINS,
        ) from None
    except ValueError as exc:
        raise FetchError(f"{base}/artifact/_SUCCESS.json: not JSON: {exc}") from None
    artifact_uri = str(success.get("artifact_uri", ""))
    name = PurePosixPath(artifact_uri).name
    if not artifact_uri.startswith(f"{base}/artifact/") or not name.endswith((".h5", ".hdf5")):
        raise FetchError(
            f"{base}/artifact/_SUCCESS.json: artifact_uri {artifact_uri!r} is not in the run's folder"
        )
    stem = name.rsplit(".", 1)[0]
    files = {name: artifact_uri}
    for suffix in (".stats.json", ".rejects.tsv"):
        files[stem + suffix] = f"{base}/output/{stem}{suffix}"
    return files, success


def _check_destination(
    dest: Path, files: dict[str, str], infos: dict[str, cloud_sync.ObjectInfo]
) -> set[str]:
    """The names to download; refuses when a file there is someone else's (nothing is changed then)."""
    record = _read_record(dest)
    todo = set()
    for name in files:
        path = dest / name
        if not path.exists():
            todo.add(name)
            continue
        if not path.is_file():
            raise FetchError(f"{path}: exists and is not a file; nothing was fetched", Exit.CONFIG)
        crc = cloud_sync.crc32c_of_file(path)
        if crc == infos[name].crc32c and path.stat().st_size == infos[name].size:
            continue  # already here, identical
        if record.get(name) != crc:
            raise FetchError(
                f"{path}: exists and was not written by this command (or was changed since): "
                "move it away or choose another folder; nothing was fetched",
                Exit.CONFIG,
            )
        todo.add(name)  # our own earlier copy of an older version
    return todo


def _read_record(dest: Path) -> dict[str, str]:
    try:
        data = json.loads((dest / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def fetch(run_uri: str, dest: Path, log: bool = True) -> dict[str, Path]:
    files, success = _wanted(run_uri)
    infos: dict[str, cloud_sync.ObjectInfo] = {}
    for name, uri in files.items():
        info = cloud_sync.stat(uri)
        if info is None:
            raise FetchError(f"{uri}: missing from the finished run", Exit.INPUT)
        infos[name] = info
    artifact = next(iter(files))
    if (infos[artifact].size, infos[artifact].crc32c or success.get("crc32c")) != (
        success.get("size"),
        success.get("crc32c"),
    ):
        raise FetchError(f"{files[artifact]}: size or CRC32C differ from _SUCCESS.json", Exit.INPUT)
    dest.mkdir(parents=True, exist_ok=True)
    todo = _check_destination(dest, files, infos)
    record = _read_record(dest)
    for name in files:
        if name not in todo:
            if log:
                print(f"{dest / name}: already here, identical", flush=True)
            continue
        uri, part = files[name], dest / f".{name}.fetching"
        cloud_sync.download_file(uri, part)  # google-cloud-storage checks the CRC32C as the bytes arrive
        crc = cloud_sync.crc32c_of_file(part)
        want = infos[name].crc32c or (success.get("crc32c") if name == artifact else None)
        checks = []
        if want is not None:
            if crc != want:
                part.unlink(missing_ok=True)
                raise FetchError(f"{uri}: CRC32C {crc} differs from the object's {want}", Exit.INPUT)
            checks.append("crc32c")
        md5 = _md5_of(uri)
        if md5 is not None:
            if _md5_file(part) != md5:
                part.unlink(missing_ok=True)
                raise FetchError(f"{uri}: MD5 differs from the object's", Exit.INPUT)
            checks.append("md5")
        if part.stat().st_size != infos[name].size:
            part.unlink(missing_ok=True)
            raise FetchError(f"{uri}: size differs from the object's", Exit.INPUT)
        part.replace(dest / name)
        record[name] = crc
        durable.write_bytes(dest / RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        if log:
            print(
                f"{dest / name}: fetched from {uri} ({infos[name].size:,} bytes, {'+'.join(checks)} ok)",
                flush=True,
            )
    _check_pair(dest / artifact, dest / f"{artifact.rsplit('.', 1)[0]}.stats.json")
    return {name: dest / name for name in files}


def _check_pair(h5: Path, stats: Path) -> None:
    """The stats file describes this artifact: the same run_key."""
    import h5py

    key = json.loads(stats.read_text()).get("run_key")
    with h5py.File(h5, "r") as f:
        own = f.attrs.get("run_key")
    own = own.decode() if isinstance(own, bytes) else own
    if key != own:
        raise FetchError(
            f"{stats}: run_key {key!r} is not the artifact's ({own!r}): they are from different runs"
        )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.remote.fetch_result",
        description="Fetch a finished run's artifact, stats and rejects files, verified, into a local "
        "folder. Exit: 0 fetched (or already here), 2 a file in the way, 3 a missing or corrupt object, "
        "10 the run is not finished.",
    )
    ap.add_argument("run_uri", help="the run's folder: gs://BUCKET/checkpoints/RUN_ID (or a local folder)")
    ap.add_argument("dest", type=Path, help="local folder to put the files in (created)")
    args = ap.parse_args(argv)
    try:
        paths = fetch(args.run_uri, args.dest)
    except FetchError as exc:
        print(f"fetch_result: {exc}", file=sys.stderr)
        return int(exc.code)
    except (cloud_sync.CloudSyncError, OSError) as exc:
        print(f"fetch_result: {exc}", file=sys.stderr)
        return int(Exit.INPUT)
    print(f"the run's files are in {args.dest.resolve()}: " + ", ".join(p.name for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
