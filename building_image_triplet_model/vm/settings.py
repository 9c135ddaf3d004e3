"""The VM's settings: one typed table, read from instance metadata and the environment, validated, stored.

A setting ``key`` is the instance attribute ``triplet-<key>`` (GCE metadata server, header
``Metadata-Flavor: Google``), overridden by the environment variable ``TRIPLET_<KEY>`` (upper case, ``-``
as ``_``). Values are data: each is matched whole against its pattern (control characters refused) and
only ever passed on as a value, never evaluated or sourced. A value that fails names the key, where it
came from and what is accepted. The resolved settings are written once to ``<config dir>/settings.json``;
every later step reads that file.

Standard library only: the bootstrap asks for a setting before the project's environment exists
(``python3 -m building_image_triplet_model.vm.settings get repo-url``).
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from building_image_triplet_model.io import durable, names

_GS = r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[A-Za-z0-9._~=+@,-]+)*/?"
_LOCAL = r"/?[A-Za-z0-9._~=+@,-]+(/[A-Za-z0-9._~=+@,-]+)*/?"
_REL = r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*"
# The run id names bucket folders, Batch jobs and labels: lowercase, digits and '-', like an instance name.
RUN_ID = r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?"
_REPO_URL = (
    r"(https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+-]+)+/?|git@[A-Za-z0-9.-]+:[A-Za-z0-9._~/-]+"
    r"|ssh://[A-Za-z0-9.@-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+-]+)+|file:///[A-Za-z0-9._/-]+)"
)
_REF = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}"


class SettingError(ValueError):
    pass


def _full(pattern: str) -> Callable[[str, str], bool]:
    rx = re.compile(pattern + r"\Z")
    return lambda value, _source: bool(rx.match(value))


def _uri(value: str, source: str) -> bool:
    """gs:// from metadata; the environment may also name a local folder (dry runs and tests)."""
    if names.climbs(value):
        return False
    return bool(re.match(_GS + r"\Z", value)) or (
        source != "metadata" and bool(re.match(_LOCAL + r"\Z", value))
    )


def _path(value: str, source: str) -> bool:
    if names.climbs(value):
        return False
    return bool(re.match(_REL + r"\Z", value)) or (
        source != "metadata" and bool(re.match(_LOCAL + r"\Z", value))
    )


def _manifest(value: str, source: str) -> bool:
    return _uri(value, "metadata") or _path(value, source)


def _ref(value: str, source: str) -> bool:
    bad = (".." in value, "//" in value, value.endswith("/"), value.endswith(".lock"))
    return bool(re.match(_REF + r"\Z", value)) and not any(bad)


def _repo(value: str, source: str) -> bool:
    return bool(re.match(_REPO_URL + r"\Z", value)) or (
        source != "metadata" and bool(re.match(r"/[A-Za-z0-9._/-]+\Z", value))
    )


def _int_range(low: int, high: int) -> Callable[[str, str], bool]:
    return lambda v, _s: bool(re.match(r"[0-9]{1,7}\Z", v)) and low <= int(v) <= high


@dataclass(frozen=True)
class Setting:
    default: str
    check: Callable[[str, str], bool]
    accepted: str  # what the check accepts, for the error message
    kind: str = "str"  # str, bool, int


SETTINGS: dict[str, Setting] = {
    "mode": Setting("single", _full("(single|worker|merge)"), "single, worker or merge"),
    "run-id": Setting(
        "", _full(RUN_ID), "1-40 lowercase letters, digits or '-' (default: the instance name)"
    ),
    "checkpoint-uri": Setting("", _uri, "a gs://bucket/prefix URI"),
    "output-uri": Setting("", _uri, "a gs://bucket/prefix URI (default: <checkpoint-uri>/<run-id>/artifact)"),
    "manifest-uri": Setting("data/downloads/raw_archives.txt", _manifest, "a gs:// URI or a repository path"),
    "repo-url": Setting("", _repo, "an https://, ssh://, git@host: or file:/// repository URL"),
    "repo-ref": Setting("gcp", _ref, "a branch, tag or commit name"),
    "preprocess-config": Setting("", lambda v, s: True, "YAML text with a data: section"),
    "preprocess-config-uri": Setting("", _uri, "a gs:// URI"),
    "preprocess-config-path": Setting("configs/vm.yaml", _path, "a repository path without '..'"),
    "extract-archives": Setting("false", _full("(?i:true|false)"), "true or false", "bool"),
    "push-interval-min": Setting("30", _int_range(1, 1440), "minutes, 1 to 1440", "int"),
    "on-done": Setting("none", _full("(none|stop|delete)"), "none, stop or delete"),
    "deploy-mode": Setting("vm", _full("(vm|mig)"), "vm or mig"),
    "metadata-cache-sync-uri": Setting("", _uri, "a gs://bucket/prefix URI"),
    "merge-wait-s": Setting("3600", _int_range(0, 864000), "seconds, 0 to 864000", "int"),
    "install-ops-agent": Setting("false", _full("(?i:true|false)"), "true or false", "bool"),
    "gpu-driver": Setting("auto", _full("(auto|skip)"), "auto or skip"),
    # true on the VM that `gcp/provision.sh image` bakes an image from: the system step, then power off.
    "bake": Setting("false", _full("(?i:true|false)"), "true or false", "bool"),
}
PATTERNS = {"run-id": RUN_ID}  # for gcp/provision.d/config.sh: one pattern for the run id
# Renamed keys: the old name is still read (with a warning) so that a VM made from an older template runs.
RENAMED = {"checkpoint-interval-min": "push-interval-min"}


def env_name(key: str) -> str:
    return "TRIPLET_" + key.upper().replace("-", "_")


class Metadata:
    """Instance attributes from the GCE metadata server (or none, in dry runs and tests)."""

    def __init__(self, mode: str, host: str, tries: int = 5) -> None:
        self.mode, self.host, self.tries = mode, host, max(1, tries)  # mode: required, optional, off

    def get(self, path: str) -> str | None:
        """The value at computeMetadata/v1/<path>, None when absent (404)."""
        if self.mode == "off":
            return None
        req = urllib.request.Request(
            f"http://{self.host}/computeMetadata/v1/{path}", headers={"Metadata-Flavor": "Google"}
        )
        for attempt in range(self.tries):
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 (http to the metadata server)
                    return resp.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
            except (urllib.error.URLError, OSError):
                pass
            if attempt < self.tries - 1:
                import time

                time.sleep(0.5 * 2**attempt)
        if self.mode == "required":
            raise SettingError(f"the metadata server http://{self.host} is unreachable (reading {path})")
        return None


def resolve(key: str, env: Mapping[str, str], md: Metadata) -> tuple[str, str]:
    """(value, where it came from): the environment, metadata, or the default."""
    spec = SETTINGS[key]
    names = [key] + [old for old, new in RENAMED.items() if new == key]
    value, source = spec.default, "default"
    for name in names:
        if env_name(name) in env:
            value, source = env[env_name(name)], f"environment {env_name(name)}"
            break
        got = md.get(f"instance/attributes/triplet-{name}")
        if got is not None:
            value, source = got, f"metadata triplet-{name}"
            break
    if "\0" in value or (key != "preprocess-config" and re.search(r"[\x00-\x1f\x7f]", value)):
        raise SettingError(f"setting '{key}' from {source}: control characters are not allowed")
    if value and not spec.check(value, "metadata" if source.startswith("metadata") else "env"):
        raise SettingError(f"setting '{key}' from {source} is invalid ({value[:80]!r}): {spec.accepted}")
    return value, source


def typed(key: str, value: str) -> Any:
    kind = SETTINGS[key].kind
    if kind == "bool":
        return value.lower() == "true"
    if kind == "int":
        return int(value)
    return value


def resolve_all(env: Mapping[str, str], md: Metadata) -> tuple[dict[str, Any], list[str]]:
    """Every setting, typed, and notes for the log (renamed keys, where non-defaults came from)."""
    out: dict[str, Any] = {}
    notes = []
    for key in SETTINGS:
        value, source = resolve(key, env, md)
        out[key] = typed(key, value)
        for old, new in RENAMED.items():
            if new == key and old in source:
                notes.append(f"setting '{old}' is now called '{new}' (read from {source})")
    return out, notes


def metadata_from_env(env: Mapping[str, str]) -> Metadata:
    tries = env.get("TRIPLET_METADATA_TRIES", "5")
    return Metadata(
        env.get("TRIPLET_METADATA", "required"),
        env.get("GCE_METADATA_HOST", "metadata.google.internal"),
        int(tries) if tries.isdigit() else 5,
    )


def load(config_dir: Path) -> dict[str, Any]:
    """The settings the config step stored."""
    data = durable.read_json(config_dir / "settings.json")
    if data is None:
        raise SettingError(f"{config_dir}/settings.json is missing: run the config step first")
    return data


def main(argv: list[str] | None = None) -> int:
    """``get KEY``: print one setting (for the steps that run before the project's environment);
    ``pattern NAME``: print a value's pattern (provisioning checks its run id with the same one)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "pattern" and args[1] in PATTERNS:
        print(f"^{PATTERNS[args[1]]}$")
        return 0
    if len(args) != 2 or args[0] != "get" or args[1] not in SETTINGS:
        print(
            f"usage: python3 -m building_image_triplet_model.vm.settings get {{{','.join(SETTINGS)}}}",
            file=sys.stderr,
        )
        return 2
    try:
        value, _ = resolve(args[1], os.environ, metadata_from_env(os.environ))
    except SettingError as exc:
        print(f"settings: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
