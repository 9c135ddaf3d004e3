"""The one check that a '/'-separated relative name stays inside its folder. Standard library only (the VM's
settings use it before ``uv sync``).

Its callers: a manifest's output names (inputs/manifest.py), the VM's path and location settings
(vm/settings.py), object keys of a local stand-in bucket and of a pull (remote/cloud_sync/). Each caller's
own pattern decides the characters allowed; this decides the parts. The extraction check (vm/extract_check.py)
normalises tar member names as tar does ('./a' is 'a'), so it refuses only '..' parts and absolute names.
"""

from __future__ import annotations


def climbs(name: str) -> bool:
    """True when ``name`` has a '.' or '..' part: refused wherever a name must stay inside its folder."""
    return any(part in (".", "..") for part in name.split("/"))
