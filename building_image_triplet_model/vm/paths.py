"""Where everything lives on the VM: the one table of folders, each overridable by its environment
variable (the dry run and the tests put them all under one folder).

    python3 -m building_image_triplet_model.vm.paths      # TRIPLET_MOUNT_WORK=/mnt/work ... (for bash)

Standard library only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class VMPaths:
    mount_raw: Path  # the raw disk: archives (aria2c's --dir)
    mount_work: Path  # the work disk: everything that must survive a new boot disk
    repo_dir: Path  # the checkout the job runs from (and its .venv)
    state_dir: Path  # phase markers
    log_dir: Path  # the bootstrap's logs
    config_dir: Path  # settings.json, the manifest copy, the effective preprocess YAML
    output_dir: Path  # the engine's output and work folder
    cache_dir: Path  # uv's cache, the Hugging Face cache
    raw_dir: Path  # aria2c's --dir
    archive_dir: Path  # where complete archives appear (out=dataset_unaligned/NNNN.tar)
    extract_dir: Path  # extraction target (triplet-extract-archives)
    run_dir: Path  # locks and pid files (tmpfs: nothing stale survives a reboot)
    system_state_dir: Path  # the boot disk's own state (driver reboot done)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> VMPaths:
        env = os.environ if env is None else env

        def get(name: str, default: str | Path) -> Path:
            return Path(env.get(f"TRIPLET_{name.upper()}") or default)

        raw = get("mount_raw", "/mnt/raw")
        work = get("mount_work", "/mnt/work")
        raw_dir = get("raw_dir", raw)
        return cls(
            mount_raw=raw,
            mount_work=work,
            repo_dir=get("repo_dir", work / "repo"),
            state_dir=get("state_dir", work / "state"),
            log_dir=get("log_dir", work / "logs"),
            config_dir=get("config_dir", work / "config"),
            output_dir=get("output_dir", work / "output"),
            cache_dir=get("cache_dir", work / "cache"),
            raw_dir=raw_dir,
            archive_dir=get("archive_dir", raw_dir / "dataset_unaligned"),
            extract_dir=get("extract_dir", raw / "extracted"),
            run_dir=get("run_dir", "/run/triplet"),
            system_state_dir=get("system_state_dir", "/var/lib/triplet"),
        )

    def shell(self) -> str:
        return "".join(f"TRIPLET_{f.name.upper()}={getattr(self, f.name)}\n" for f in fields(self))


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(VMPaths.from_env().shell())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
