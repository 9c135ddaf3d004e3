"""A stand-in for the engine's command line, fast and scriptable, for the bootstrap flow tests.

    python -m fake_processor --config CFG

Reads data.input_dir/data.hdf5_path from CFG, writes a work folder with a shard and a commit marker, then
the artifact (temporary name, renamed). With --follow it first waits, as the real engine does, until every
archive of data.manifest is in input_dir. FAKE_ENGINE_EXIT forces an exit code, FAKE_ENGINE_SLEEP makes it
slow; SIGTERM exits 75 like the real engine. Every start is appended to FAKE_ENGINE_STARTS when set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import yaml


def _term(signum: int, frame: FrameType | None) -> None:
    sys.exit(75)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--follow", action="store_true")
    ap.add_argument("--task-index", type=int)
    ap.add_argument("--task-count", type=int)
    args, extra = ap.parse_known_args()
    if args.task_count is not None:
        extra = ["--task-index", str(args.task_index), "--task-count", str(args.task_count), *extra]
    if args.follow:
        extra.append("--follow")
    signal.signal(signal.SIGTERM, _term)
    data = yaml.safe_load(Path(args.config).read_text())["data"]
    if os.environ.get("FAKE_ENGINE_STARTS"):
        with open(os.environ["FAKE_ENGINE_STARTS"], "a") as f:
            f.write(f"{os.getpid()} {os.environ.get('METADATA_CACHE_SYNC_URI', '-')} {' '.join(extra)}\n")
    if os.environ.get("FAKE_ENGINE_EXIT"):
        return int(os.environ["FAKE_ENGINE_EXIT"])
    if args.follow:
        from building_image_triplet_model.inputs import manifest, work_split

        names = manifest.archives(data["manifest"])
        if args.task_count is not None:
            names = work_split.task_share(names, args.task_index, args.task_count)
        for name in names:
            while not (Path(data["input_dir"]) / f"{name}.tar").exists():
                time.sleep(0.1)
    out = Path(data["hdf5_path"])
    work = out.with_name(out.stem + ".work")
    (work / "emb" / "0001").mkdir(parents=True, exist_ok=True)
    inputs = sorted(
        str(p.relative_to(data["input_dir"])) for p in Path(data["input_dir"]).rglob("*") if p.is_file()
    )
    digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()
    (work / "run.json").write_text(json.dumps({"inputs": inputs}))
    (work / "emb" / "0001" / "0-10.npz").write_bytes(os.urandom(50_000))
    (work / "emb" / "0001" / "_SUCCESS.json").write_text(json.dumps({"rows": 10}))
    (work / "lock").write_text(str(os.getpid()))
    (work / ".half.npz.abc.tmp").write_bytes(b"partial")
    with out.with_name(out.stem + ".log").open("a") as log:
        log.write("fake engine ran\n")
    time.sleep(float(os.environ.get("FAKE_ENGINE_SLEEP", "0")))
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(digest.encode() + os.urandom(100_000))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
