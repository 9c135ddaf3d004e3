"""Before an archive is extracted: every member must stay inside the extraction folder.

Refused (the whole archive, before anything is written): absolute names, '..' components, device and FIFO
members, symlinks or hard links pointing outside, members reached through a link (a link can redirect a
later member), and any archive the strict tar reader refuses (truncated, damaged).

    python -m building_image_triplet_model.vm.extract_check ARCHIVE   # prints "<files>\\t<members>"
"""

from __future__ import annotations

import re
import sys
from pathlib import Path, PurePosixPath

from building_image_triplet_model.inputs import tar_reader
from building_image_triplet_model.io import durable
from building_image_triplet_model.io.progress import utc_now


def _norm(path: str) -> PurePosixPath | None:
    """A relative member path, normalised; None when it is absolute or climbs out with '..'."""
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return None
    parts: list[str] = []
    for p in path.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            return None
        parts.append(p)
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _inside(member_dir: PurePosixPath, target: str) -> bool:
    """A symlink target, relative to the link's folder, stays inside the extraction root."""
    if target.startswith("/"):
        return False
    depth = [] if str(member_dir) == "." else list(member_dir.parts)
    for p in target.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not depth:
                return False
            depth.pop()
        else:
            depth.append(p)
    return True


def check(path: Path) -> tuple[list[str], int, int]:
    """(refusals, regular files, members)."""
    bad: list[str] = []
    links: set[PurePosixPath] = set()
    names: list[tuple[PurePosixPath, str]] = []
    files = total = 0
    for m in tar_reader.walk(path):
        total += 1
        n = _norm(m.name)
        if n is None:
            bad.append(f"{m.name!r}: absolute path or '..'")
            continue
        names.append((n, m.name))
        if m.type == b"2":
            links.add(n)
            if not _inside(n.parent, m.link):
                bad.append(f"{m.name!r}: symlink to {m.link!r} points outside")
        elif m.type == b"1":
            links.add(n)
            if _norm(m.link) is None:
                bad.append(f"{m.name!r}: hard link to {m.link!r} points outside")
        elif m.is_regular:
            files += 1
        elif not m.is_dir:
            bad.append(f"{m.name!r}: special file (device, fifo) not allowed")
    for n, orig in names:
        through = next((p for p in n.parents if p in links), None)
        if through is not None:
            bad.append(f"{orig!r}: goes through the link {str(through)!r}")
    return bad, files, total


def marker(extract_dir: Path, ident: str) -> Path:
    return extract_dir / ".triplet-extract" / f"{ident}.json"


def is_done(extract_dir: Path, ident: str, archive: Path) -> bool:
    try:
        m = durable.read_json(marker(extract_dir, ident)) or {}
    except durable.CorruptFileError:
        return False
    st = archive.stat()
    return (
        (extract_dir / ident).is_dir()
        and m.get("archive_size") == st.st_size
        and m.get("archive_mtime_ns") == st.st_mtime_ns
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cmd, rest = (args[0], args[1:]) if args else ("", [])
    if cmd == "is-done" and len(rest) == 3:
        return 0 if is_done(Path(rest[0]), rest[1], Path(rest[2])) else 1
    if cmd == "mark" and len(rest) == 4:
        st = Path(rest[2]).stat()
        durable.write_json(
            marker(Path(rest[0]), rest[1]),
            {
                "archive": rest[2],
                "archive_size": st.st_size,
                "archive_mtime_ns": st.st_mtime_ns,
                "files": int(rest[3]),
                "status": "done",
                "extracted_at": utc_now(),
            },
        )
        return 0
    if cmd == "summary" and rest:
        durable.write_json(
            rest[0],
            {
                k: (v == "true") if v in ("true", "false") else int(v)
                for k, v in (a.split("=", 1) for a in rest[1:])
            },
        )
        return 0
    if cmd != "check" or len(rest) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        bad, files, total = check(Path(rest[0]))
    except (tar_reader.TarError, OSError) as exc:
        print(f"{rest[0]}: not a readable tar: {exc}", file=sys.stderr)
        return 1
    for b in bad[:50]:
        print(f"{rest[0]}: refused member {b}", file=sys.stderr)
    if len(bad) > 50:
        print(f"{rest[0]}: ... and {len(bad) - 50} more refused members", file=sys.stderr)
    if bad:
        return 1
    print(f"{files}\t{total}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
