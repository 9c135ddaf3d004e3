#!/usr/bin/env python3
"""Small, strict helpers for the VM bootstrap scripts (stdlib only; runs with Debian's python3).

Everything that would be fragile in bash lives here: JSON markers written atomically, aria2c manifests parsed
and validated, tar archives checked for completeness and for members that would escape the extraction folder,
apt sources gaining Debian's contrib/non-free components, the preprocess YAML (PyYAML: the project venv).

Each subcommand prints errors on stderr as one line naming the file, the line or the member, and exits 1 for
"no" (not complete, refused) and 2 for usage or malformed input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

# ---------------------------------------------------------------------------------------------------- JSON


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        print(f"warning: {path}: unreadable JSON ({e}); starting from an empty object", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def _set_path(obj: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = obj.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            obj[k] = nxt
        obj = nxt
    obj[keys[-1]] = value


def _get_path(obj: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


def _parse_assignments(items: Sequence[str]) -> list[tuple[str, str, Any]]:
    """``key=string``, ``key:=json``, ``key+=1`` (integer increment), ``key@=json`` (append to a list)."""
    out = []
    for item in items:
        m = re.match(r"^([A-Za-z0-9_.-]+)(:=|\+=|@=|=)(.*)$", item, re.S)
        if not m:
            raise SystemExit(f"bad assignment {item!r} (key=str, key:=json, key+=N, key@=json)")
        key, op, raw = m.groups()
        val: Any = raw
        if op in (":=", "@="):
            try:
                val = json.loads(raw)
            except ValueError as e:
                raise SystemExit(f"{key}: not JSON: {e}") from e
        elif op == "+=":
            val = int(raw)
        out.append((key, op, val))
    return out


def cmd_json_update(args: argparse.Namespace) -> int:
    """Merge assignments into a JSON object file, atomically (temporary name, fsync, rename)."""
    path = Path(args.file)
    obj = _read_json(path)
    for key, op, val in _parse_assignments(args.assignments):
        if op == "+=":
            cur = _get_path(obj, key)
            _set_path(obj, key, (cur if isinstance(cur, int) else 0) + val)
        elif op == "@=":
            cur = _get_path(obj, key)
            lst = list(cur) if isinstance(cur, list) else []
            lst.append(val)
            _set_path(obj, key, lst[-args.keep :] if args.keep else lst)
        else:
            _set_path(obj, key, val)
    if args.merge_file:
        extra = _read_json(Path(args.merge_file))
        _set_path(obj, args.merge_key, extra)
    obj["updated_at"] = _now()
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
    return 0


def cmd_json_line(args: argparse.Namespace) -> int:
    """Append one JSON object (one line, one write) to a .jsonl file: the structured log."""
    obj: dict[str, Any] = {"time": _now()}
    for key, op, val in _parse_assignments(args.assignments):
        _set_path(obj, key, val if op != "+=" else int(val))
    line = (json.dumps(obj, sort_keys=False) + "\n").encode()
    Path(args.file).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(args.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return 0


def cmd_json_get(args: argparse.Namespace) -> int:
    obj = _read_json(Path(args.file))
    val = _get_path(obj, args.key)
    if val is None:
        if args.default is None:
            return 1
        print(args.default)
        return 0
    print(val if isinstance(val, str) else json.dumps(val))
    return 0


# ------------------------------------------------------------------------------------------- manifests
_OUT_RE = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")
_ALLOWED_OPTIONS = {"out", "checksum"}


def _safe_rel(path: str) -> bool:
    return bool(_OUT_RE.match(path)) and not any(p in (".", "..") for p in path.split("/"))


def parse_manifest(path: Path, repo_root: Path) -> list[dict[str, str]]:
    """aria2c input-file format: a URI line, then option lines starting with whitespace (``\\tout=...``).

    Only ``out`` and ``checksum`` options are accepted: aria2c options such as ``on-download-complete`` would
    run commands, and a manifest may come from a bucket.
    """
    entries: list[dict[str, str]] = []
    cur: dict[str, str] | None = None
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path}:{lineno}"
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0] in " \t":
            if cur is None:
                raise ValueError(f"{where}: option line before any URI")
            key, sep, val = raw.strip().partition("=")
            if not sep or key not in _ALLOWED_OPTIONS:
                raise ValueError(f"{where}: unsupported option {raw.strip()!r} (only out= and checksum=)")
            if key == "out" and not _safe_rel(val):
                raise ValueError(f"{where}: out={val!r} must be a relative path without '..'")
            if key == "checksum" and not re.match(r"^(sha-1|sha-256|sha-512|md5)=[0-9a-fA-F]+$", val):
                raise ValueError(f"{where}: bad checksum={val!r}")
            cur[key] = val
            continue
        uri = raw.strip().split("\t")[0]
        if re.search(r"[\s\"'`$\\;|&<>(){}]", uri):
            raise ValueError(f"{where}: URI has characters that are not allowed: {uri!r}")
        cur = {"uri": uri, "line": str(lineno)}
        m = re.match(r"^(https?|ftp|sftp)://[^/]+(/.*)?$", uri)
        if m:
            cur["kind"] = "http"
        elif uri.startswith("gs://"):
            cur["kind"] = "gs"
        elif uri.startswith("file://"):
            cur["kind"] = "file"
            rest = uri[len("file://") :]
            src = Path(rest) if rest.startswith("/") else repo_root / rest
            if not rest.startswith("/") and not _safe_rel(rest):
                raise ValueError(f"{where}: relative file:// path must stay inside the repository: {uri!r}")
            cur["src"] = str(src)
        else:
            raise ValueError(f"{where}: unsupported URI {uri!r} (http(s)://, gs://, file://)")
        entries.append(cur)
    for e in entries:
        if "out" not in e:
            name = PurePosixPath(e["uri"].split("?", 1)[0]).name
            if not _safe_rel(name):
                raise ValueError(f"{path}:{e['line']}: cannot derive a file name from {e['uri']!r}; add out=")
            e["out"] = name
    outs = [e["out"] for e in entries]
    dups = sorted({o for o in outs if outs.count(o) > 1})
    if dups:
        raise ValueError(f"{path}: several entries write {', '.join(dups)}")
    return entries


def _record_path(raw_dir: Path, out: str) -> Path:
    return raw_dir / ".triplet-downloads" / f"{out}.json"


def _entry_complete(raw_dir: Path, e: dict[str, str]) -> tuple[bool, str]:
    dest = raw_dir / e["out"]
    if Path(str(dest) + ".aria2").exists():
        return False, "aria2c control file present (partial)"
    if not dest.is_file():
        return False, "missing"
    rec = _read_json(_record_path(raw_dir, e["out"]))
    st = dest.stat()
    if not rec:
        return False, "no completion record"
    if rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns:
        return False, "changed since it was verified"
    return True, "complete"


def cmd_manifest(args: argparse.Namespace) -> int:
    """Print one TSV line per entry: status, kind, uri, out, src (file://) or '-', reason."""
    try:
        entries = parse_manifest(Path(args.manifest), Path(args.repo_root))
    except (OSError, ValueError) as e:
        print(f"manifest: {e}", file=sys.stderr)
        return 2
    raw_dir = Path(args.raw_dir)
    for e in entries:
        ok, why = _entry_complete(raw_dir, e)
        print(
            "\t".join(
                ["complete" if ok else "pending", e["kind"], e["uri"], e["out"], e.get("src", "-"), why]
            )
        )
    return 0


def cmd_aria2_input(args: argparse.Namespace) -> int:
    """Write an aria2c input file for the given outs (only URI + out= + checksum=)."""
    entries = {e["out"]: e for e in parse_manifest(Path(args.manifest), Path(args.repo_root))}
    lines = []
    for out in args.outs:
        e = entries[out]
        lines.append(e["uri"])
        lines.append(f"\tout={e['out']}")
        if "checksum" in e:
            lines.append(f"\tchecksum={e['checksum']}")
    _atomic_write(Path(args.output), ("\n".join(lines) + "\n").encode())
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """After verification: remember that raw_dir/out is complete (its size and mtime)."""
    raw_dir = Path(args.raw_dir)
    dest = raw_dir / args.out
    st = dest.stat()
    rec = {
        "uri": args.uri,
        "out": args.out,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "verified_at": _now(),
    }
    _atomic_write(_record_path(raw_dir, args.out), (json.dumps(rec, indent=2) + "\n").encode())
    return 0


# ------------------------------------------------------------------------------------------------ tar
def tar_complete(path: Path) -> tuple[bool, str, int]:
    """Complete tar: every header parses, the last member's data fits, an end-of-archive block follows."""
    size = path.stat().st_size
    members = 0
    end = 0
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                members += 1
                end = m.offset_data + (((m.size + 511) // 512) * 512 if m.isreg() else 0)
                if end > size:
                    return False, f"member {m.name!r} runs past the end of the file (truncated)", members
            f.seek(end)
            block = f.read(512)
    except (tarfile.TarError, OSError, EOFError) as e:
        return False, f"not a readable tar: {e}", members
    if len(block) < 512 or block.count(0) != 512:
        return False, "no end-of-archive block (truncated)", members
    return True, "complete", members


def cmd_tar_check(args: argparse.Namespace) -> int:
    ok, why, n = tar_complete(Path(args.file))
    if not ok:
        print(f"{args.file}: {why}", file=sys.stderr)
        return 1
    print(n)
    return 0


def _norm(path: str) -> PurePosixPath | None:
    """Normalise a relative member path; None when it is absolute or climbs out with '..'."""
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


def _resolve_link(member_dir: PurePosixPath, target: str) -> bool:
    """True when a symlink target, relative to the link's folder, stays inside the extraction root."""
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


def validate_tar(path: Path) -> tuple[list[str], int, int]:
    """Refusals (one line per bad member), regular files, total members.

    Refused: absolute names, '..' components, device/fifo members, symlinks or hard links that point outside
    the extraction folder, and members whose path goes through a link (a link can redirect a later member).
    """
    bad: list[str] = []
    links: set[PurePosixPath] = set()
    names: list[tuple[PurePosixPath, str]] = []
    files = total = 0
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            total += 1
            n = _norm(m.name)
            if n is None:
                bad.append(f"{m.name!r}: absolute path or '..'")
                continue
            names.append((n, m.name))
            if m.issym():
                links.add(n)
                if not _resolve_link(n.parent, m.linkname):
                    bad.append(f"{m.name!r}: symlink to {m.linkname!r} points outside")
            elif m.islnk():
                links.add(n)
                if _norm(m.linkname) is None:
                    bad.append(f"{m.name!r}: hard link to {m.linkname!r} points outside")
            elif m.isreg():
                files += 1
            elif not m.isdir():
                bad.append(f"{m.name!r}: special file (device, fifo) not allowed")
    for n, orig in names:
        for parent in n.parents:
            if parent in links:
                bad.append(f"{orig!r}: goes through the link {str(parent)!r}")
                break
    return bad, files, total


def cmd_tar_validate(args: argparse.Namespace) -> int:
    try:
        bad, files, total = validate_tar(Path(args.file))
    except (tarfile.TarError, OSError, EOFError) as e:
        print(f"{args.file}: not a readable tar: {e}", file=sys.stderr)
        return 1
    if bad:
        for b in bad[:50]:
            print(f"{args.file}: refused member {b}", file=sys.stderr)
        if len(bad) > 50:
            print(f"{args.file}: ... and {len(bad) - 50} more refused members", file=sys.stderr)
        return 1
    print(f"{files}\t{total}")
    return 0


# -------------------------------------------------------------------------------------------------- apt
_DEBIAN_URI = re.compile(
    r"(deb\.debian\.org|security\.debian\.org|ftp\.[a-z.]*debian\.org|/debian(-security)?/?)"
)
_COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")


def _with_components(existing: list[str]) -> list[str]:
    return existing + [c for c in _COMPONENTS if c not in existing]


def enable_components(text: str, deb822: bool) -> str:
    """Add contrib, non-free and non-free-firmware to Debian's own archive entries (others untouched)."""
    out = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(.*)$", stanza, re.M)
            if uris and _DEBIAN_URI.search(uris.group(1)):
                stanza = re.sub(
                    r"^(Components:)[ \t]*(.*)$",
                    lambda m: f"{m.group(1)} {' '.join(_with_components(m.group(2).split()))}",
                    stanza,
                    flags=re.M,
                )
            out.append(stanza)
        return "\n\n".join(out)
    for line in text.split("\n"):
        m = re.match(r"^(\s*deb(?:-src)?\s+(?:\[[^\]]*\]\s+)?)(\S+)(\s+)(\S+)((?:\s+\S+)*)\s*$", line)
        if m and _DEBIAN_URI.search(m.group(2)) and not line.lstrip().startswith("#"):
            comps = m.group(5).split()
            line = f"{m.group(1)}{m.group(2)}{m.group(3)}{m.group(4)} {' '.join(_with_components(comps))}"
        out.append(line)
    return "\n".join(out)


def cmd_apt_components(args: argparse.Namespace) -> int:
    changed = 0
    for name in args.files:
        p = Path(name)
        if not p.is_file():
            continue
        text = p.read_text(encoding="utf-8")
        new = enable_components(text, deb822=p.suffix == ".sources")
        if new != text:
            _atomic_write(p, new.encode())
            changed += 1
            print(f"enabled contrib non-free non-free-firmware in {p}", file=sys.stderr)
    print(changed)
    return 0


# ------------------------------------------------------------------------------------------ YAML config
def _load_yaml(path: Path) -> Any:
    import yaml  # the project venv has PyYAML

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def cmd_config_check(args: argparse.Namespace) -> int:
    """The preprocess YAML must parse (safe_load) into a mapping with a ``data`` mapping."""
    p = Path(args.file)
    if p.stat().st_size > args.max_bytes:
        print(f"{p}: larger than {args.max_bytes} bytes", file=sys.stderr)
        return 1
    try:
        cfg = _load_yaml(p)
    except Exception as e:
        print(
            f"{p}: not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr
        )
        return 1
    if not isinstance(cfg, dict) or not isinstance(cfg.get("data"), dict):
        print(f"{p}: must be a mapping with a 'data:' section", file=sys.stderr)
        return 1
    return 0


def cmd_config_effective(args: argparse.Namespace) -> int:
    """Write BASE with dotted keys set (``data.input_dir=/mnt/raw/...``) to OUT, atomically."""
    import yaml

    cfg = _load_yaml(Path(args.base)) or {}
    for item in args.set:
        key, sep, val = item.partition("=")
        if not sep:
            print(f"--set {item!r}: expected key=value", file=sys.stderr)
            return 2
        _set_path(cfg, key, val)
    text = "# written by gcp/scripts/startup_preprocess.sh from " + args.base + "\n"
    text += yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
    _atomic_write(Path(args.output), text.encode())
    return 0


def cmd_config_get(args: argparse.Namespace) -> int:
    val = _get_path(_load_yaml(Path(args.file)), args.key)
    if val is None:
        if args.default is None:
            return 1
        val = args.default
    print(val)
    return 0


# ------------------------------------------------------------------------------------------------- misc
def cmd_host(args: argparse.Namespace) -> int:
    print(socket.gethostname())
    return 0


def _descendants(pid: int) -> Iterator[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    stack = [pid]
    while stack:
        p = stack.pop()
        for c in children.get(p, []):
            yield c
            stack.append(c)


def cmd_descendants(args: argparse.Namespace) -> int:
    for p in _descendants(args.pid):
        print(p)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("json-update", help="merge key=str / key:=json / key+=N / key@=json into a JSON file")
    p.add_argument("file")
    p.add_argument("assignments", nargs="*")
    p.add_argument("--merge-file", help="a JSON file whose object is stored under --merge-key")
    p.add_argument("--merge-key", default="summary")
    p.add_argument("--keep", type=int, default=0, help="keep only the last N items of appended lists")
    p.set_defaults(fn=cmd_json_update)
    p = sub.add_parser("json-line", help="append one JSON object as a line to a .jsonl file")
    p.add_argument("file")
    p.add_argument("assignments", nargs="*")
    p.set_defaults(fn=cmd_json_line)
    p = sub.add_parser("json-get", help="print a (dotted) key of a JSON file; exit 1 when absent")
    p.add_argument("file")
    p.add_argument("key")
    p.add_argument("--default")
    p.set_defaults(fn=cmd_json_get)
    p = sub.add_parser("manifest", help="status of every manifest entry (TSV)")
    p.add_argument("manifest")
    p.add_argument("raw_dir")
    p.add_argument("--repo-root", required=True)
    p.set_defaults(fn=cmd_manifest)
    p = sub.add_parser("aria2-input", help="write an aria2c input file for some entries")
    p.add_argument("manifest")
    p.add_argument("output")
    p.add_argument("outs", nargs="*")
    p.add_argument("--repo-root", required=True)
    p.set_defaults(fn=cmd_aria2_input)
    p = sub.add_parser("record", help="record a verified download")
    p.add_argument("raw_dir")
    p.add_argument("out")
    p.add_argument("uri")
    p.set_defaults(fn=cmd_record)
    p = sub.add_parser("tar-check", help="exit 0 when FILE reads as a complete tar")
    p.add_argument("file")
    p.set_defaults(fn=cmd_tar_check)
    p = sub.add_parser(
        "tar-validate", help="exit 0 when no member of FILE could escape the extraction folder"
    )
    p.add_argument("file")
    p.set_defaults(fn=cmd_tar_validate)
    p = sub.add_parser("apt-components", help="enable contrib/non-free(-firmware) in Debian apt sources")
    p.add_argument("files", nargs="*")
    p.set_defaults(fn=cmd_apt_components)
    p = sub.add_parser("config-check", help="the preprocess YAML parses into a mapping with data:")
    p.add_argument("file")
    p.add_argument("--max-bytes", type=int, default=256 * 1024)
    p.set_defaults(fn=cmd_config_check)
    p = sub.add_parser("config-effective", help="BASE + --set key=value -> OUT")
    p.add_argument("base")
    p.add_argument("output")
    p.add_argument("--set", action="append", default=[])
    p.set_defaults(fn=cmd_config_effective)
    p = sub.add_parser("config-get", help="print a dotted key of a YAML file")
    p.add_argument("file")
    p.add_argument("key")
    p.add_argument("--default")
    p.set_defaults(fn=cmd_config_get)
    p = sub.add_parser("hostname")
    p.set_defaults(fn=cmd_host)
    p = sub.add_parser("descendants", help="every descendant pid of PID")
    p.add_argument("pid", type=int)
    p.set_defaults(fn=cmd_descendants)
    args = ap.parse_args(argv)
    try:
        return int(args.fn(args))
    except SystemExit:
        raise
    except (OSError, ValueError) as e:
        print(f"{args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
