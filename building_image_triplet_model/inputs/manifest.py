"""The aria2c manifest: the one parser, for the engine (which archives a run expects), the scale-out split
and the download phase.

aria2c's input format: a URI line, then option lines that start with whitespace
(``\\tout=dataset_unaligned/0088.tar``).
A manifest may come from a bucket, so it is read strictly: only ``out=`` and ``checksum=`` options
(aria2c options such as ``on-download-complete`` would run commands), ``out`` a relative path without
``..``, URIs of the kinds the download phase fetches (http(s), gs://, file://), no shell characters, and
no two entries writing the same file. Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from building_image_triplet_model.io import names

ARCHIVE = re.compile(r"(?:^|/)([A-Za-z0-9][A-Za-z0-9._-]*)\.tar$")
_OUT = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")
_OPTIONS = ("out", "checksum")
_CHECKSUM = re.compile(r"^(sha-1|sha-256|sha-512|md5)=[0-9a-fA-F]+$")
_BAD_URI_CHARS = re.compile(r"[\s\"'`$\\;|&<>(){}]")


class ManifestError(ValueError):
    """The manifest is malformed or unsafe; the message names the file and line."""


@dataclass(frozen=True)
class Entry:
    uri: str
    kind: str  # http, gs, file
    out: str  # the file it becomes, relative to the download folder
    line: int
    checksum: str | None = None
    src: str | None = None  # a file:// entry's path

    @property
    def archive(self) -> str | None:
        """The source name (NNNN) it downloads, or None for other files (the readmes)."""
        m = ARCHIVE.search(self.out)
        return m.group(1) if m else None


def safe_relative(path: str) -> bool:
    return bool(_OUT.match(path)) and not names.climbs(path)


def parse(text: str, where: str = "manifest", repo_root: Path | None = None) -> list[Entry]:
    raw: list[dict[str, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        at = f"{where}:{lineno}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not raw:
                raise ManifestError(f"{at}: option line before any URI")
            key, sep, value = line.strip().partition("=")
            if not sep or key not in _OPTIONS:
                raise ManifestError(f"{at}: unsupported option {line.strip()!r} (only out= and checksum=)")
            if key == "out" and not safe_relative(value):
                raise ManifestError(f"{at}: out={value!r} must be a relative path without '..'")
            if key == "checksum" and not _CHECKSUM.match(value):
                raise ManifestError(f"{at}: bad checksum={value!r}")
            raw[-1][key] = value
            continue
        uri = line.strip().split("\t")[0]
        if _BAD_URI_CHARS.search(uri):
            raise ManifestError(f"{at}: URI has characters that are not allowed: {uri!r}")
        raw.append({"uri": uri, "line": str(lineno)})
    entries = [_entry(r, where, repo_root) for r in raw]
    first: dict[str, Entry] = {}
    for e in entries:
        if e.out in first:
            raise ManifestError(
                f"{where}:{e.line}: several entries write {e.out} (lines {first[e.out].line} and {e.line})"
            )
        first[e.out] = e
    return entries


def _entry(r: dict[str, str], where: str, repo_root: Path | None) -> Entry:
    uri, at = r["uri"], f"{where}:{r['line']}"
    src = None
    if re.match(r"^(https?|ftp|sftp)://[^/]+(/.*)?$", uri):
        kind = "http"
    elif uri.startswith("gs://"):
        kind = "gs"
    elif uri.startswith("file://"):
        kind = "file"
        rest = uri[len("file://") :]
        if not rest.startswith("/") and not safe_relative(rest):
            raise ManifestError(f"{at}: relative file:// path must stay inside the repository: {uri!r}")
        src = rest if rest.startswith("/") else str((repo_root or Path.cwd()) / rest)
    else:
        raise ManifestError(f"{at}: unsupported URI {uri!r} (http(s)://, gs://, file://)")
    out = r.get("out") or PurePosixPath(uri.split("?", 1)[0]).name
    if not safe_relative(out):
        raise ManifestError(f"{at}: cannot derive a file name from {uri!r}; add out=")
    return Entry(uri, kind, out, int(r["line"]), r.get("checksum"), src)


def load(path: str | Path, repo_root: Path | None = None) -> list[Entry]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot be read: {exc}") from None
    return parse(text, str(path), repo_root)


def archives(path: str | Path) -> list[str]:
    """The archive names (NNNN) a manifest names, sorted."""
    return sorted({a for e in load(path) if (a := e.archive)})


def render(entries: list[Entry], out_prefix: str = "") -> str:
    """Entries back as aria2c input (``out`` under ``out_prefix``: the download phase's staging folder)."""
    lines = []
    for e in entries:
        lines += [e.uri, f"\tout={out_prefix}{e.out}"]
        if e.checksum:
            lines.append(f"\tchecksum={e.checksum}")
    return "\n".join(lines) + "\n"
