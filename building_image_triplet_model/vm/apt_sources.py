"""Enable Debian's contrib, non-free and non-free-firmware components (the NVIDIA driver lives in
non-free) in Debian's own apt entries; third-party repositories are left alone. Idempotent.

    python3 -m building_image_triplet_model.vm.apt_sources FILE...   # prints how many files changed

Standard library only: it runs before the project's environment exists.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from building_image_triplet_model.io import durable

_DEBIAN_URI = re.compile(
    r"(deb\.debian\.org|security\.debian\.org|ftp\.[a-z.]*debian\.org|/debian(-security)?/?)"
)
COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")


def _with_components(existing: list[str]) -> list[str]:
    return existing + [c for c in COMPONENTS if c not in existing]


def enable_components(text: str, deb822: bool) -> str:
    if deb822:
        out = []
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
    lines = []
    for line in text.split("\n"):
        m = re.match(r"^(\s*deb(?:-src)?\s+(?:\[[^\]]*\]\s+)?)(\S+)(\s+)(\S+)((?:\s+\S+)*)\s*$", line)
        if m and _DEBIAN_URI.search(m.group(2)) and not line.lstrip().startswith("#"):
            comps = m.group(5).split()
            line = f"{m.group(1)}{m.group(2)}{m.group(3)}{m.group(4)} {' '.join(_with_components(comps))}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    changed = 0
    for name in sys.argv[1:] if argv is None else argv:
        p = Path(name)
        if not p.is_file():
            continue
        text = p.read_text(encoding="utf-8")
        new = enable_components(text, deb822=p.suffix == ".sources")
        if new != text:
            durable.write_bytes(p, new.encode())
            changed += 1
            print(f"enabled {' '.join(COMPONENTS[1:])} in {p}", file=sys.stderr)
    print(changed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
