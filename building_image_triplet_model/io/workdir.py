"""The run's home: every path of an output and its work folder, and what is done in it.

    out/dataset.h5                    the artifact (appears only when complete)
    out/dataset.h5.partial            the artifact being assembled
    out/dataset.rejects.tsv           every rejected item
    out/dataset.stats.json            the run's counts; written last
    out/dataset.log                   every run's log
    out/dataset.work/                 the work folder (what checkpoints carry)
      work_folder.json                the engine made (or adopted) this folder: the only one it writes in
      lock, run.json, progress.json, events.jsonl
      index/<source>.npz|.json        a source's index shard, and its marker written after it
      metadata_cache_complete.npz     every source's index merged
      plan.npz, plan.json             the selected rows and targets, and the key they were made for
      knn/<knn key>/<split>/...       KNN rows in chunks; <split>/_SUCCESS.json when complete
      emb/<model key>/model.json      what the model key stands for
      emb/<model key>/<source>-<content key>/   an archive's embeddings (embed/store.py)
      emb/<model key>/.locks/<source>-<content key>.lock   held (POSIX lock) by the run writing that store
      assemble.json                   how far the copy into the artifact got
      corrupt/                        committed files that did not read back, moved aside

With ``data.embeddings_dir`` the ``emb/`` tree above lives in that folder instead, shared by every output
that names it (each image embedded once per model); it holds its own ownership marker (EMB_OWNER_MARKER),
``users/<output digest>.json`` (each output that used it, and its stores), and ``corrupt/``.

Keys are digests (identity.py) of exactly what determines a folder's contents, so a changed setting finds
a different folder instead of mixing with the old one. Every committed file is immutable, written through
durable.py, with a commit marker (_SUCCESS.json, written by :func:`commit`) last.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.errors import LockedError, RunError
from building_image_triplet_model.io import durable, faults, locks

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
CACHE_NAME = "metadata_cache_complete.npz"
OWNER_MARKER = "work_folder.json"  # the engine made this folder (ownership.py): the only one it writes in
EMB_OWNER_MARKER = "embeddings_folder.json"  # the same for a shared data.embeddings_dir
INDEX_VERSION = 2  # 2: image checksums; a shard of another version is indexed again


class Layout:
    """The paths of one run (an output and its work folder)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.output = Path(cfg.hdf5_path)
        self.work = Path(cfg.work_dir) if cfg.work_dir else self.output.with_name(self.output.stem + ".work")
        # data.embeddings_dir: the stores live there, shared with every output naming it (None: own emb/)
        self.shared_emb = Path(cfg.embeddings_dir) if cfg.embeddings_dir else None

    def _beside(self, suffix: str) -> Path:
        return self.output.with_name(self.output.stem + suffix)

    # beside the output
    @property
    def partial(self) -> Path:
        return self.output.with_name(self.output.name + ".partial")

    @property
    def rejects(self) -> Path:
        return self._beside(".rejects.tsv")

    @property
    def stats(self) -> Path:
        return self._beside(".stats.json")

    @property
    def log(self) -> Path:
        return self._beside(".log")

    # the work folder
    @property
    def owner_marker(self) -> Path:
        return self.work / OWNER_MARKER

    @property
    def lock(self) -> Path:
        return self.work / "lock"

    @property
    def run_json(self) -> Path:
        return self.work / "run.json"

    @property
    def progress_json(self) -> Path:
        return self.work / "progress.json"

    @property
    def events(self) -> Path:
        return self.work / "events.jsonl"

    @property
    def index_dir(self) -> Path:
        return self.work / "index"

    def shard(self, source: str) -> Path:
        return self.index_dir / f"{source}.npz"

    def shard_marker(self, source: str) -> Path:
        return self.index_dir / f"{source}.json"

    def shard_rejects(self, source: str) -> Path:
        return self.index_dir / f"{source}.rejects.tsv"

    @property
    def cache(self) -> Path:
        return self.work / CACHE_NAME

    @property
    def plan(self) -> Path:
        return self.work / "plan.npz"

    @property
    def plan_json(self) -> Path:
        return self.work / "plan.json"

    @property
    def knn_root(self) -> Path:
        return self.work / "knn"

    def knn_split(self, knn_key: str, split: str) -> Path:
        return self.knn_root / knn_key / split

    @property
    def own_emb_root(self) -> Path:
        """The work folder's own embeddings (the default; the only ones --discard-embeddings removes)."""
        return self.work / "emb"

    @property
    def emb_root(self) -> Path:
        return self.shared_emb if self.shared_emb is not None else self.own_emb_root

    @property
    def emb_owner_marker(self) -> Path:
        return self.emb_root / EMB_OWNER_MARKER

    @property
    def emb_users(self) -> Path:
        """One file per output that used the shared embeddings folder (status: who shares a store)."""
        return self.emb_root / "users"

    def emb_user_file(self, output: Path | None = None) -> Path:
        out = os.path.realpath(output or self.output)
        return self.emb_users / f"{hashlib.sha256(out.encode()).hexdigest()[:16]}.json"

    def store_lock(self, model_key: str, store: Path) -> Path:
        return self.model_dir(model_key) / ".locks" / f"{store.name}.lock"  # *.lock: checkpoints skip it

    def model_dir(self, model_key: str) -> Path:
        return self.emb_root / model_key

    def model_json(self, model_key: str) -> Path:
        return self.model_dir(model_key) / "model.json"

    def store_dir(self, model_key: str, source: str, content_key: str) -> Path:
        return self.model_dir(model_key) / f"{source}-{content_key}"

    def rel(self, path: Path) -> str:
        """A path of the work folder as a run folder names it (the scale-out shards mirror the layout)."""
        return path.relative_to(self.work).as_posix()

    def shard_files(self, model_key: str, sources: list[str]) -> list[str]:
        """What a scale-out worker publishes for these archives (patterns relative to the work folder):
        index shards and their markers, the embedding stores, and what the model key stands for."""
        out = [self.rel(self.model_json(model_key))]
        for s in sources:
            out += [self.rel(self.shard(s)), self.rel(self.shard_marker(s))]
            out.append(self.rel(self.store_dir(model_key, s, "*") / "*"))
        return out

    def stores_committed(self, model_key: str, names: set[str]) -> set[str]:
        """The archives whose embedding store's marker is among ``names`` (paths relative to the work
        folder, as a run folder lists them)."""
        prefix, tail = self.rel(self.model_dir(model_key)) + "/", "/" + SUCCESS
        return {
            n[len(prefix) : -len(tail)].rsplit("-", 1)[0]
            for n in names
            if n.startswith(prefix) and n.endswith(tail) and n.count("/") == prefix.count("/") + 1
        }

    @property
    def assemble_json(self) -> Path:
        return self.work / "assemble.json"

    @property
    def corrupt_dir(self) -> Path:
        return self.work / "corrupt"

    # ------------------------------------------------------------------------------ what is done
    def index_marker(self, name: str, signature: dict[str, Any] | None) -> dict[str, Any] | None:
        """The marker of a source's shard when the shard is complete and still describes the source
        (``signature``: the source's now; None when the archive is not here, as in a merge)."""
        marker = durable.read_json(self.shard_marker(name))
        if not marker or marker.get("version") != INDEX_VERSION or not self.shard(name).exists():
            return None
        if marker.get("stale") or (signature is not None and marker.get("signature") != signature):
            return None
        return marker

    def knn_rows_done(self, knn_key: str, split: str, n: int) -> int:
        folder = self.knn_split(knn_key, split)
        if (folder / SUCCESS).exists():
            return n
        return sum(min(b, n) - a for a, b in ranges_done(folder))

    def assemble_progress(self, run_key: str) -> dict[str, Any]:
        """The copy's durable progress for this run, or {} (another run's progress starts over)."""
        marker = durable.read_json(self.assemble_json) or {}
        if marker.get("run_key") != run_key or not self.partial.exists():
            return {}
        return marker

    def is_complete(self, run_key: str) -> bool:
        """The artifact exists and its stats file (written last) says it was made for this run."""
        stats = durable.read_json(self.stats) or {}
        return self.output.exists() and stats.get("run_key") == run_key

    # ------------------------------------------------------------------------------ maintenance
    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a committed file that did not read back out of the way (kept for a look, never read). Only
        the engine's files move: one of its work folder, or the stats or rejects file beside the output."""
        home, corrupt = self.work, self.corrupt_dir
        if self.shared_emb is not None and path.is_relative_to(self.shared_emb):
            home, corrupt = self.shared_emb, self.shared_emb / "corrupt"  # a shared store's file stays there
        inside = path.is_relative_to(home) and ".." not in path.relative_to(home).parts
        if not inside and path not in (self.stats, self.rejects):
            raise RunError(f"{path} did not read back ({reason}); it is not the engine's file to move aside")
        rel = path.relative_to(home) if inside else Path(path.name)
        # The time and a counter: a file damaged twice within a second keeps both copies.
        stem = f"{rel.as_posix().replace('/', '__')}.{time.strftime('%Y%m%dT%H%M%S')}"
        target = corrupt / stem
        n = 1
        while target.exists():
            target, n = corrupt / f"{stem}.{n}", n + 1
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            os.replace(path, target)
            durable.fsync_dir(path.parent)
        log.warning("%s is corrupt (%s): moved to %s; it is computed again", path, reason, target)
        marker = path.parent / SUCCESS
        if inside and path.name != SUCCESS and marker.exists():
            marker.unlink()  # the folder lost a file: it is no longer complete
            durable.fsync_dir(path.parent)
        return target

    def discard(self, keep_embeddings: bool) -> None:
        """--fresh: the artifact, the plan, the KNN tables and the index (every archive is indexed again)
        go; the embedding stores stay unless told otherwise: unchanged archives reuse them. Only these names
        are removed: anything else in the work folder or beside the output is not the engine's and stays.
        A shared data.embeddings_dir is never touched here (the caller refuses --discard-embeddings with
        one: ownership.check_discard)."""
        files = [self.output, self.partial, self.stats, self.rejects, self.run_json, self.progress_json]
        files += [self.cache, self.plan, self.plan_json, self.assemble_json]
        folders = [self.index_dir, self.knn_root] + ([] if keep_embeddings else [self.own_emb_root])
        for path in files + folders:
            if path.is_symlink() or (path.is_file() and path in files):
                log.warning("--fresh: removing %s", path)
                path.unlink()  # a link goes, never what it points to
            elif path.is_dir() and path in folders:
                log.warning("--fresh: removing %s", path)
                shutil.rmtree(path)

    def remove_interrupted_writes(self) -> None:
        """Temporary files of writes a kill interrupted: at the work folder's top level and in its own
        folders only, never in a folder the Layout does not define."""
        for path in self.work.glob(f".*{durable.TMP_SUFFIX}"):
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
        # A shared embeddings folder's temporary files may be another run's writes in flight: each store's
        # are removed by the run that holds its lock (steps.embed_rows), never here.
        for folder in (self.index_dir, self.knn_root, self.own_emb_root):
            if not folder.is_symlink():
                durable.remove_tmp_files(folder)

    def remove_stale_keys(self, folder: Path, keep: str) -> None:
        """Delete the other keys' folders under ``folder`` (cheap steps: another key is recomputed)."""
        if folder.is_dir():
            for child in folder.iterdir():
                if child.name != keep and child.is_dir():
                    shutil.rmtree(child)


def range_name(start: int, stop: int) -> str:
    """The file of rows [start, stop) of a chunked step."""
    return f"{start:010d}-{stop:010d}.npz"


def ranges_done(folder: Path) -> list[tuple[int, int]]:
    """The (start, stop) of every completed chunk file in folder, sorted."""
    out = []
    if folder.is_dir():
        for path in folder.glob("*-*.npz"):
            a, _, b = path.stem.partition("-")
            if a.isdigit() and b.isdigit():
                out.append((int(a), int(b)))
    return sorted(out)


def commit(path: Path, marker: dict[str, Any]) -> None:
    """Write a commit marker: the last file of a unit of work, after everything it describes is durable
    (a folder's _SUCCESS.json, an index shard's .json, the plan's plan.json, the run's stats file)."""
    durable.write_json(path, marker)
    faults.point(f"commit:{path.parent.name}/{path.name}")


def committed(folder: Path) -> dict[str, Any] | None:
    return durable.read_json(folder / SUCCESS)


_HELD: set[Path] = set()  # lock files this process holds (a POSIX lock dies when ANY of its fds closes)


class RunLock:
    """The run lock on ``<work>/lock`` (io/locks.py: decode workers that outlive a killed parent for a
    moment never keep the next run out), with the holder's pid inside."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free (True); False while another process holds it."""
        if self.path.resolve() in _HELD:
            raise RuntimeError(f"{self.path}: this process holds it already")  # a second fd would drop it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = locks.acquire(self.path)
        if fd is None:
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        _HELD.add(self.path.resolve())
        return True

    def __enter__(self) -> RunLock:
        if not self.try_acquire():
            holder = self.path.read_text().strip() or "unknown"
            raise LockedError(f"{self.path}: another processor (pid {holder}) is running on this output")
        return self

    def release(self) -> None:
        self.__exit__()

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            _HELD.discard(self.path.resolve())
            os.close(self._fd)
            self._fd = None


def lock_holder(path: Path) -> int | None:
    """The pid of the processor holding the lock at ``path``, or None. Creates nothing."""
    if path.resolve() in _HELD:
        return os.getpid()  # opening the file here would release our own lock
    if not locks.held_by_other(path):
        return None
    try:
        text = path.read_text(errors="replace")[:32].strip()
    except FileNotFoundError:
        return -1
    return int(text) if text.isdigit() else -1
