"""Runs the steps in order, each resumable: index -> plan -> geographic KNN -> embeddings -> assemble.

Also owns the run's identity (``run.json``: the settings and input fingerprints a resume must match),
the lock, signal handling and the mapping from failures to exit codes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import assemble, embed, faults, geo_knn, index, plan, workdir
from .config import ConfigError, DataConfig, fingerprint
from .errors import BackboneError
from .progress import Progress, setup_logging, utc_now
from .records import REJECT_REASONS
from .sources import InputError, Source, list_sources

log = logging.getLogger(__name__)

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INPUT = 3
EXIT_REFUSED = 4
EXIT_LOCKED = 5
EXIT_MODEL = 6
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: progress is durable, run again
STOP_GRACE_S = 8.0  # after a stop request the process is gone within this, whatever it was doing


def new_run_record(cfg: DataConfig) -> dict[str, Any]:
    """What run.json (and a scale-out run's run_settings.json) starts as: the settings and their digest."""
    return {"settings": cfg.settings(), "settings_fp": cfg.settings_fp, "created": utc_now()}


class ResumeRefused(RuntimeError):
    pass


class Interrupted(Exception):
    pass


@dataclass
class Task:
    """This worker's share of a scale-out run (index, count)."""

    index: int
    count: int


DUPLICATE_SIGNAL_S = 2.0  # a group kill plus a forwarding wrapper deliver one stop request twice


def install_signal_handlers(stop: threading.Event) -> None:
    first: list[float] = []

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            if time.monotonic() - first[0] < DUPLICATE_SIGNAL_S:
                return  # the same request, delivered twice: keep saving
            log.warning("%s again: exiting now (completed work is on disk)", name)
            os._exit(EXIT_INTERRUPTED)
        first.append(time.monotonic())
        stop.set()
        log.warning(
            "%s received: saving progress, exiting within %.0f s (exit code %d)",
            name,
            STOP_GRACE_S,
            EXIT_INTERRUPTED,
        )

        def watchdog() -> None:
            time.sleep(STOP_GRACE_S)
            log.warning("still busy %.0f s after %s: exiting (completed work is on disk)", STOP_GRACE_S, name)
            # Decode and index workers would otherwise linger until they notice their parent is gone.
            for child in multiprocessing.active_children():
                child.kill()
            logging.shutdown()
            os._exit(EXIT_INTERRUPTED)

        threading.Thread(target=watchdog, name="stop-watchdog", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def fresh_start(cfg: DataConfig) -> None:
    """Discard the outputs of a previous run; the per-source index shards are kept (they are checked
    against their archives and are independent of every setting)."""
    for path in (cfg.output, assemble.partial_path(cfg.output), cfg.stats_path, cfg.rejects_path):
        if path.exists():
            log.warning("--fresh: removing %s", path)
            path.unlink()
    work = cfg.work
    if work.is_dir():
        for child in work.iterdir():
            if child.name in ("index", index.CACHE_NAME, "lock", "events.jsonl"):
                continue
            log.warning("--fresh: removing %s", child)
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()


class Runner:
    def __init__(self, cfg: DataConfig, stop: threading.Event, task: Task | None = None, merge: bool = False):
        self.cfg = cfg
        self.stop = stop
        self.task = task
        self.merge = merge
        self.work = cfg.work
        self.progress = Progress(self.work)
        self.run_path = self.work / "run.json"
        self.markers: dict[str, dict[str, Any]] = {}

    # ---- identity ------------------------------------------------------------------------------
    def check_settings(self) -> dict[str, Any]:
        run = workdir.read_json(self.run_path)
        if run is None:
            leftovers = [
                p.name for p in (self.work / "plan.npz", self.work / "knn", self.work / "emb") if p.exists()
            ]
            if leftovers:
                raise ResumeRefused(
                    f"{self.work}: holds {', '.join(leftovers)} but no run.json, so it cannot be trusted; "
                    "rerun with --fresh to start over"
                )
            run = new_run_record(self.cfg)
            workdir.write_json(self.run_path, run)
            return run
        if run.get("settings_fp") != self.cfg.settings_fp:
            old, settings = run.get("settings", {}), self.cfg.settings()
            details = ", ".join(
                f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in self.cfg.changed_settings(old)
            )
            raise ResumeRefused(
                f"{self.cfg.output}: the existing run was made with other settings ({details}); "
                f"refusing to mix them. Rerun with --fresh to discard {self.work} and start over, or "
                "restore the previous settings"
            )
        return run

    def check_inputs(self, run: dict[str, Any], names: list[str], markers: dict[str, dict[str, Any]]) -> None:
        inputs = [[n, markers[n]["digest"]] for n in names]
        fp = fingerprint(inputs)
        if "inputs_fp" not in run:
            run.update(inputs_fp=fp, inputs=[n for n, _ in inputs])
            workdir.write_json(self.run_path, run)
        elif run["inputs_fp"] != fp:
            before, now = set(run.get("inputs", [])), set(names)
            what = []
            if now - before:
                what.append(f"added {sorted(now - before)}")
            if before - now:
                what.append(f"removed {sorted(before - now)}")
            if not what:
                what.append("an archive's contents changed")
            raise ResumeRefused(
                f"{self.cfg.output}: the input set differs from the existing run's ({'; '.join(what)}). "
                f"Rerun with --fresh to rebuild (unchanged archives are not indexed again)"
            )

    def check_embedding_identity(self, run: dict[str, Any], device_type: str, precision: str) -> None:
        ident = {"device_type": device_type, "precision": precision}
        if "embedding" not in run:
            run["embedding"] = ident
            workdir.write_json(self.run_path, run)
        elif run["embedding"] != ident:
            raise ResumeRefused(
                f"{self.cfg.output}: embeddings so far were made with {run['embedding']}, this machine would "
                f"use {ident}: refusing to mix them in one file. Set data.device/data.precision to match, "
                "or rerun with --fresh"
            )

    # ---- sources -------------------------------------------------------------------------------
    def expected_names(self) -> list[str] | None:
        if not self.cfg.manifest:
            return None
        from .work_split import manifest_sources

        return manifest_sources(self.cfg.manifest)

    def resolve_sources(self) -> tuple[list[str], list[Source]]:
        """(every source name of the run, the sources this process indexes)."""
        expected = self.expected_names()
        present: list[Source] = []
        if self.merge:
            if expected is None:
                raise ConfigError("data.manifest: a merge needs the run's manifest to know every archive")
            return expected, []
        try:
            present = list_sources(self.cfg.input_dir)
        except InputError:
            if expected is None or not self.task:
                raise
        names = [s.name for s in present] if expected is None else expected
        if self.task:
            from .work_split import task_share

            mine = set(task_share(names, self.task.index, self.task.count))
            by_name = {s.name: s for s in present}
            missing = sorted(mine - by_name.keys())
            if missing:
                raise InputError(
                    f"{self.cfg.input_dir}: archives of this task are missing: {', '.join(missing)}"
                )
            return sorted(mine), [by_name[n] for n in sorted(mine)]
        if expected is not None:
            by_name = {s.name: s for s in present}
            missing = [
                n for n in expected if n not in by_name and not index.cached_marker(None, self.work, n)
            ]
            if missing:
                raise InputError(
                    f"{self.cfg.input_dir}: archives named in the manifest are missing: {', '.join(missing)}"
                )
            return expected, [by_name[n] for n in expected if n in by_name]
        return names, present

    # ---- steps ---------------------------------------------------------------------------------
    def step_index(self, names: list[str], present: list[Source]) -> dict[str, dict[str, Any]]:
        markers = index.index_all(
            present, self.work, self.cfg.index_workers or index.cpu_count(), self.stop, self.progress
        )
        if self.stop.is_set():
            raise Interrupted
        for name in names:
            if name not in markers:
                marker = index.cached_marker(None, self.work, name)
                if marker is None:
                    raise InputError(
                        f"source {name}: no archive in {self.cfg.input_dir} and no index shard in {self.work}"
                    )
                markers[name] = marker
        self.progress.finish("index", images=sum(m["images"] for m in markers.values()))
        return markers

    def step_plan(self, cache: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        path = self.work / "plan.npz"
        if path.exists():
            return workdir.read_npz(path)
        p = plan.make_plan(cache, self.cfg)
        if len(p["rows"]) == 0:
            raise InputError(
                f"{self.cfg.input_dir}: no valid image/metadata pair (see {self.cfg.rejects_path})"
            )
        workdir.write_npz(path, p)
        faults.point("plan.written")
        summary = plan.summary(p, names)
        workdir.write_json(self.work / "plan.json", summary)
        log.info(
            "plan: %d images of %d targets (train %d, val %d, test %d targets)",
            summary["images"],
            summary["targets"],
            *summary["targets_per_split"].values(),
        )
        return p

    def step_knn(self, p: dict[str, np.ndarray]) -> dict[str, Path]:
        dirs = {}
        total = len(p["target_keys"])
        done = sum(
            geo_knn.rows_done(self.work / "knn" / split, len(plan.split_targets(p, split)))
            for split in plan.SPLITS
        )
        self.progress.start("knn", total=total, done=done, unit="targets")
        threads = self.cfg.index_workers or index.cpu_count()
        for split in plan.SPLITS:
            pos = plan.split_targets(p, split)
            folder = self.work / "knn" / split
            dirs[split] = folder
            k = plan.knn_k(self.cfg.knn_k, len(pos))
            complete = geo_knn.run_split(
                folder,
                p["target_lat"][pos],
                p["target_lon"][pos],
                k,
                self.stop,
                threads,
                on_rows=lambda n: self.progress.advance("knn", n),
                chunk_rows=self.cfg.knn_chunk_rows,
            )
            if not complete:
                raise Interrupted
        self.progress.finish("knn")
        return dirs

    def step_embed(
        self,
        run: dict[str, Any],
        cache: dict[str, np.ndarray],
        names: list[str],
        p: dict[str, np.ndarray],
        sources: dict[str, Source],
    ) -> None:
        starts = p["src_start"]
        counts = plan.source_counts(p)
        works = embed.plan_work(names, counts, self.work / "emb", self.cfg.batch_size)
        mine = {s.name for s in sources.values()} if self.task else set(names)
        todo_rows = sum(b - a for w in works if w.name in mine for a, b in w.pending)
        total_rows = sum(w.n for w in works if w.name in mine)
        self.progress.start("embed", total=total_rows, done=total_rows - todo_rows, unit="images")
        for w in works:
            if w.name not in mine:
                w.pending = []
        if todo_rows == 0:
            # Chunks may be complete while a kill came before the commit marker.
            for w in works:
                if not w.complete and w.name in mine and embed.covered(embed.done_chunks(w.folder), w.n):
                    embed.finish_source(w, None, {})
            self.progress.finish("embed")
            return
        missing = [w.name for w in works if w.pending and w.name not in sources]
        if missing:
            raise InputError(
                f"{self.cfg.input_dir}: embeddings of {', '.join(missing)} are missing and so is the archive"
            )
        from . import backbone as bb
        from .decode import ImageReader

        model = bb.load(self.cfg)
        self.check_embedding_identity(run, model.device.type, model.precision)
        src_list = [sources.get(n) for n in names]
        reader = ImageReader(
            [str(s.path) if s else "" for s in src_list], [bool(s and s.kind == "tar") for s in src_list]
        )
        extra = {
            "model": self.cfg.feature_model,
            "precision": model.precision,
            "device": model.device.type,
            "weights": model.weights,
            "input_size": list(model.data_config["input_size"]),
        }

        # Locators come from the per-source shards of the sources with work left, not the merged cache:
        # a resumed run reads index data in proportion to what remains.
        first_row = np.cumsum([0] + [self.markers[n]["images"] for n in names])
        shards: dict[int, Any] = {}

        def items_for(s: int, a: int, b: int) -> dict[str, np.ndarray]:
            if s not in shards:
                shards[s] = index.load_shard(self.work, names[s], lazy=True)
            local = p["rows"][starts[s] + a : starts[s] + b] - first_row[s]
            return {
                "source": np.full(len(local), s, np.int32),
                "path": shards[s]["path"][local],
                "offset": shards[s]["offset"][local],
                "size": shards[s]["size"][local],
            }

        def on_source_done(w: embed.SourceWork) -> None:
            marker = workdir.read_json(w.folder / workdir.SUCCESS) or {}
            marker.update(extra)
            workdir.write_json(w.folder / workdir.SUCCESS, marker)
            log.info(
                "embedded %s: %d images (%d failed to decode)",
                w.name,
                marker.get("rows", 0),
                marker.get("failed", 0),
            )
            if self.on_source_published:
                self.on_source_published(w.name)

        complete = embed.embed_all(
            works,
            items_for,
            model,
            reader,
            self.cfg,
            self.stop,
            on_batch=self._batch_done,
            on_source_done=on_source_done,
            on_chunk=self.on_chunk,
        )
        if self.stop.is_set() or not complete:
            raise Interrupted
        self.progress.finish("embed")

    def _batch_done(self, n: int) -> None:
        self.progress.advance("embed", n)
        if self.on_batch:
            self.on_batch(n)

    # Hooks for scale-out (scale_out.py) and benchmarks: after the index step, each batch, chunk, source.
    on_batch: Any = None
    after_index: Any = None
    on_source_published: Any = None
    on_chunk: Any = None

    def step_assemble(
        self,
        run: dict[str, Any],
        cache: dict[str, np.ndarray],
        names: list[str],
        p: dict[str, np.ndarray],
        knn_dirs: dict[str, Path],
    ) -> tuple[dict[str, Any], np.ndarray]:
        out = self.cfg.output
        partial = assemble.partial_path(out)
        starts = p["src_start"]
        counts = plan.source_counts(p)
        emb_root = self.work / "emb"
        first = workdir.read_json(emb_root / names[int(np.argmax(counts))] / workdir.SUCCESS) or {}
        dim = int(first.get("dim") or 0)
        if not dim:
            dims = {
                int((workdir.read_json(emb_root / n / workdir.SUCCESS) or {}).get("dim") or 0) for n in names
            }
            dim = max(dims)
        n = len(p["rows"])
        marker_path = self.work / assemble.MARKER
        marker = workdir.read_json(marker_path) or {}
        if marker.get("run_fp") != run["settings_fp"] + run["inputs_fp"] or not partial.exists():
            marker = {}
        codes = assemble.gather_codes(emb_root, names, counts)
        stats = self.stats(run, p, codes, names, cache, first)
        if not marker:
            self.progress.start("assemble", total=n, done=0, unit="images")
            log.info("assembling %s: writing the skeleton", partial)
            offset = assemble.write_skeleton(
                partial,
                cache,
                p,
                knn_dirs,
                codes,
                dim,
                self.cfg.embedding_dtype,
                self.attrs(run, stats, first),
            )
            faults.point("assemble.skeleton")
            marker = {
                "run_fp": run["settings_fp"] + run["inputs_fp"],
                "offset": offset,
                "rows_done": 0,
                "rows": n,
            }
            workdir.write_json(marker_path, marker)
        else:
            self.progress.start("assemble", total=n, done=int(marker["rows_done"]), unit="images")
        complete = assemble.copy_embeddings(
            partial,
            int(marker["offset"]),
            dim,
            self.cfg.embedding_dtype,
            emb_root,
            names,
            starts,
            marker_path,
            marker,
            self.stop,
            on_rows=lambda k: self.progress.advance("assemble", k),
        )
        if not complete:
            raise Interrupted
        assemble.verify(partial, emb_root, names, starts, n, dim)
        faults.point("assemble.verified")
        os.replace(partial, out)
        workdir.fsync_dir(out.parent)
        self.progress.finish("assemble")
        return stats, codes

    def stats(
        self,
        run: dict[str, Any],
        p: dict[str, np.ndarray],
        codes: np.ndarray,
        names: list[str],
        cache: dict[str, np.ndarray],
        emb_marker: dict[str, Any],
    ) -> dict[str, Any]:
        all_codes = np.concatenate([cache["rej_reason"], codes[codes != 0]])
        found, counts = np.unique(all_codes, return_counts=True)
        rejects = {REJECT_REASONS[c]: int(n) for c, n in zip(found, counts, strict=True)}
        return {
            "images": len(p["rows"]),
            "valid_images": int((codes == 0).sum()),
            "targets": len(p["target_keys"]),
            "targets_per_split": {s: int((p["target_split"] == i).sum()) for i, s in enumerate(plan.SPLITS)},
            "sources": names,
            "rejects": dict(sorted(rejects.items())),
            "settings_fp": run["settings_fp"],
            "inputs_fp": run["inputs_fp"],
            "model": emb_marker.get("model", self.cfg.feature_model),
            "precision": emb_marker.get("precision"),
            "device": emb_marker.get("device"),
            "weights": emb_marker.get("weights"),
        }

    def attrs(self, run: dict[str, Any], stats: dict[str, Any], emb_marker: dict[str, Any]) -> dict[str, Any]:
        return {
            "feature_model": self.cfg.feature_model,
            "image_size": int((emb_marker.get("input_size") or [0, 0, self.cfg.image_size or 0])[-1]),
            "precision": str(emb_marker.get("precision")),
            "weights": str(emb_marker.get("weights")),
            "config_fingerprint": run["settings_fp"],
            "inputs_fingerprint": run["inputs_fp"],
            "settings": run["settings"],
            "n_images": stats["images"],
            "n_valid_images": stats["valid_images"],
            "n_targets": stats["targets"],
            "targets_per_split": stats["targets_per_split"],
            "rejects": stats["rejects"],
            "knn_distance_unit": "m",
            "embedding_dtype": self.cfg.embedding_dtype,
        }

    def write_rejects(
        self, cache: dict[str, np.ndarray], names: list[str], decode: list[tuple[str, str, str]] | None = None
    ) -> None:
        lines = ["source\tpath\treason\tdetail"]
        for src, path, code, detail in zip(
            cache["rej_source_idx"], cache["rej_path"], cache["rej_reason"], cache["rej_detail"], strict=True
        ):
            lines.append(
                f"{names[src]}\t{path.decode(errors='replace')}\t{REJECT_REASONS[code]}\t{detail.decode(errors='replace')}"
            )
        for src, path, reason in decode or []:
            lines.append(f"{src}\t{path}\t{reason}\t")
        workdir.write_bytes(self.cfg.rejects_path, ("\n".join(lines) + "\n").encode())

    def decode_rejects(
        self, cache: dict[str, np.ndarray], names: list[str], p: dict[str, np.ndarray], codes: np.ndarray
    ) -> list[tuple[str, str, str]]:
        bad = np.flatnonzero(codes != 0)
        rows = p["rows"][bad]
        return [
            (
                names[cache["source_idx"][r]],
                cache["path"][r].decode(errors="replace"),
                REJECT_REASONS[codes[i]],
            )
            for i, r in zip(bad, rows, strict=True)
        ]

    # ---- the whole run -------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        run = self.check_settings()
        workdir.remove_tmp_files(self.work)
        names, present = self.resolve_sources()
        markers = self.step_index(names, present)
        self.markers = markers
        if self.after_index:
            self.after_index()
        index.merge_cache(self.work, names, markers)
        sync_uri = os.environ.get("METADATA_CACHE_SYNC_URI")
        if sync_uri and not self.task:
            index.upload_cache(self.work, sync_uri)
        cache = index.load_cache(self.work)
        self.check_inputs(run, names, markers)
        if not (cfg.rejects_path.exists() and cfg.output.exists()):
            self.write_rejects(cache, names)
        if self.task:
            p = self.task_plan(cache, names)
            self.step_embed(run, cache, names, p, {s.name: s for s in present})
            self.progress.finish("task", status="done")
            return EXIT_OK
        if (
            cfg.output.exists()
            and (workdir.read_json(cfg.stats_path) or {}).get("settings_fp") == run["settings_fp"]
        ):
            log.info("%s is complete; nothing to do (use --fresh to rebuild)", cfg.output)
            return EXIT_OK
        p = self.step_plan(cache, names)
        knn_dirs = self.step_knn(p)
        self.step_embed(run, cache, names, p, {s.name: s for s in present})
        stats, codes = self.step_assemble(run, cache, names, p, knn_dirs)
        self.write_rejects(cache, names, self.decode_rejects(cache, names, p, codes))
        stats["completed"] = utc_now()
        workdir.write_json(cfg.stats_path, stats)
        log.info(
            "done: %s holds %d images (%d valid) of %d targets; %d items rejected (%s)",
            cfg.output,
            stats["images"],
            stats["valid_images"],
            stats["targets"],
            sum(stats["rejects"].values()),
            cfg.rejects_path,
        )
        return EXIT_OK

    def task_plan(self, cache: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """A worker embeds every good image of its sources: the single run's plan restricted to them."""
        if self.cfg.selects_subset:
            raise ConfigError(
                "data.n_samples/data.n_images: a scale-out worker sees only its own archives, so it cannot "
                "choose a subset of all targets; leave both unset for a scale-out run"
            )
        p = plan.make_plan(cache, self.cfg)
        return p


def execute(
    cfg: DataConfig,
    fresh: bool = False,
    task: Task | None = None,
    merge: bool = False,
    stop: threading.Event | None = None,
    hooks: Any = None,
) -> int:
    """Run the processor; returns the exit code."""
    stop = stop or threading.Event()
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg.log_path, events_file=cfg.work / "events.jsonl")
    log.info("processor started (pid %d): %s -> %s", os.getpid(), cfg.input_dir, cfg.output)
    try:
        with workdir.RunLock(cfg.work / "lock"):
            if fresh:
                fresh_start(cfg)
            runner = Runner(cfg, stop, task=task, merge=merge)
            if hooks is not None:
                hooks(runner)
            return runner.run()
    except workdir.LockedError as exc:
        log.error("%s", exc)
        return EXIT_LOCKED
    except Interrupted:
        log.warning(
            "interrupted: progress is saved; run the same command again to continue (exit %d)",
            EXIT_INTERRUPTED,
        )
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    except InputError as exc:
        log.error("input error: %s", exc)
        return EXIT_INPUT
    except ResumeRefused as exc:
        log.error("%s", exc)
        return EXIT_REFUSED
    except Exception as exc:
        if stop.is_set():
            log.warning(
                "interrupted while %s: %s; progress is saved: run the same command again (exit %d)",
                type(exc).__name__,
                exc,
                EXIT_INTERRUPTED,
            )
            return EXIT_INTERRUPTED
        if isinstance(exc, BackboneError):
            log.error("model error: %s", exc)
            return EXIT_MODEL
        log.exception("unexpected error")
        return EXIT_ERROR
