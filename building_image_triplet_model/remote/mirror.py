"""Mirror the manifest's archives into the raw bucket, verified and resumable, then write the manifest that
points at the bucket.

    python -m building_image_triplet_model.remote.mirror --manifest MANIFEST --to gs://RAW_BUCKET/PREFIX \\
        --work DIR --out-manifest FILE [--upload-manifest gs://...]
    gcp/provision.sh mirror                  # the same with gcp/provision.conf's buckets and manifest

One entry at a time, so the local disk needs room for one archive (the largest is ~15 GB):

1. an object already at ``<to>/<out>`` is done (objects appear whole, and only verified files are uploaded);
2. else the VM's own download phase fetches it (``gcp/scripts/download_archives.sh`` on a one-entry manifest:
   aria2c with resume, the control file saved every second, the size checked, and for a ``.tar`` the strict
   tar reader of ``sources.check_archive`` reading it to its end-of-archive marker);
3. the verified file is uploaded create-only with its CRC32C checked (``cloud_sync.upload_file``), then
   deleted locally.

Kill it at any moment (SIGKILL included) and run it again: finished archives are skipped, an interrupted
download resumes where aria2c's control file says, an interrupted upload starts over. An archive that does not
verify is named and never uploaded (exit 3); the others go on. SIGTERM/SIGINT: the download saves its state,
exit 75.

Why a job of ours and not Storage Transfer Service's URL-list transfer: a URL list must give every file's size
and base64 MD5, which the dataset's server does not publish (we would have to download everything once to
write the list), and STS cannot run our strict tar check, so a truncated or zero-filled archive would land in
the bucket as if it were whole. docs/preprocessing_gcp.md weighs both.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.inputs import manifest
from building_image_triplet_model.io import durable
from building_image_triplet_model.remote import cloud_sync
from building_image_triplet_model.vm import downloads

REPO = Path(__file__).resolve().parents[2]
DOWNLOAD_SCRIPT = REPO / "gcp" / "scripts" / "download_archives.sh"


def _log(message: str) -> None:
    print(f"mirror: {message}", file=sys.stderr, flush=True)


def _same(local: Path, info: cloud_sync.ObjectInfo) -> bool:
    return local.stat().st_size == info.size and cloud_sync.crc32c_of_file(local) == info.crc32c


def _download(entry: manifest.Entry, work: Path) -> int:
    """The download phase on one entry; its exit code (0: the file is complete and verified)."""
    one = work / ".mirror" / "entry.txt"
    one.parent.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(one, manifest.render([entry]).encode())
    env = {**os.environ, "TRIPLET_REPO_DIR": str(REPO), "TRIPLET_PYTHON": sys.executable}
    env.setdefault("TRIPLET_ARIA2_JOBS", "1")
    proc = subprocess.Popen(
        ["bash", str(DOWNLOAD_SCRIPT), "--manifest", str(one), "--dir", str(work)], env=env
    )
    try:
        return proc.wait()
    except BaseException:
        # SIGTERM/SIGINT here: the download saves aria2c's state when it gets the signal too.
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise


def mirror_one(entry: manifest.Entry, to: str, work: Path) -> str | None:
    """Mirror one entry; None when it is in the bucket, else why not."""
    uri = f"{to}/{entry.out}"
    local = work / entry.out
    if cloud_sync.stat(uri) is not None:
        _log(f"{entry.out}: already in {uri}")
        local.unlink(missing_ok=True)
        return None
    if not downloads.complete(work, entry.out)[0]:
        rc = _download(entry, work)
        if rc != 0 or not downloads.complete(work, entry.out)[0]:
            return (
                f"{entry.out} ({entry.uri}) did not download whole and verified (download exit {rc}): "
                "not uploaded"
            )
    try:
        info = cloud_sync.upload_file(local, uri, if_generation_match=0)
    except FileExistsError:  # uploaded by an earlier run that was killed right after
        info = cloud_sync.stat(uri)  # type: ignore[assignment]
        if info is None or not _same(local, info):
            return (
                f"{uri} exists and differs from the verified {local}: delete it or mirror to another prefix"
            )
    _log(f"{entry.out}: {info.size:,} bytes verified (strict tar check, CRC32C) and uploaded to {uri}")
    local.unlink()
    downloads.record_path(work, entry.out).unlink(missing_ok=True)
    return None


def mirrored_manifest(entries: list[manifest.Entry], to: str) -> str:
    """The manifest with every entry read from the bucket (same ``out``, same checksum)."""
    return manifest.render([replace(e, uri=f"{to}/{e.out}", kind="gs") for e in entries])


def run(source: Path, to: str, work: Path, out_manifest: Path, upload_manifest: str | None = None) -> int:
    to = to.rstrip("/")
    try:
        entries = manifest.load(source)
    except manifest.ManifestError as exc:
        _log(str(exc))
        return int(Exit.CONFIG)
    work.mkdir(parents=True, exist_ok=True)
    failed = []
    for n, entry in enumerate(entries, 1):
        _log(f"[{n}/{len(entries)}] {entry.out}")
        why = mirror_one(entry, to, work)
        if why:
            _log(f"REFUSED: {why}")
            failed.append(why)
    if failed:
        _log(
            f"{len(failed)} of {len(entries)} entries not mirrored; run again once fixed: {'; '.join(failed)}"
        )
        return int(Exit.INPUT)
    text = mirrored_manifest(entries, to)
    durable.write_bytes(out_manifest, text.encode())
    if upload_manifest:
        cloud_sync.write_text(upload_manifest, text)
    where = f"{out_manifest}" + (f" and {upload_manifest}" if upload_manifest else "")
    _log(f"all {len(entries)} entries are in {to}; the manifest that reads them from there: {where}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.remote.mirror",
        description="Mirror a manifest's archives into a bucket (verified, resumable) and write the manifest "
        "that reads them from there. Exit: 0 all mirrored, 2 usage or bad manifest, 3 an entry did not "
        "verify (named), 75 interrupted (run again).",
    )
    ap.add_argument("--manifest", type=Path, required=True, help="the aria2c manifest (upstream URLs)")
    ap.add_argument("--to", required=True, help="gs://RAW_BUCKET/PREFIX (or a local folder standing in)")
    ap.add_argument("--work", type=Path, required=True, help="local folder for one archive at a time")
    ap.add_argument("--out-manifest", type=Path, required=True, help="where to write the mirrored manifest")
    ap.add_argument("--upload-manifest", help="also write it to this object (gs://...)")
    args = ap.parse_args(argv)

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return run(args.manifest, args.to, args.work, args.out_manifest, args.upload_manifest)
    except KeyboardInterrupt:
        _log("interrupted: the download's state is saved; run the same command again to continue")
        return int(Exit.INTERRUPTED)
    except (cloud_sync.CloudSyncError, OSError) as exc:
        _log(f"failed: {exc}")
        return int(Exit.ERROR)


if __name__ == "__main__":
    sys.exit(main())
