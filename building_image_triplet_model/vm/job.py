"""The job: download -> (extract) -> preprocess -> finalize -> on-done, each phase skipped when its
marker says done and its output is still there.

When the engine reads the archives in place (the default), the download and the preprocess phases run at
once: the download script moves each archive into the archive folder only when it is complete and
verified, and the engine (``--follow``) indexes and embeds every archive as it appears; the plan, KNN and
assembly run once all are there. A preemption during either resumes both. With extraction the phases run
one after the other.

A SIGTERM (systemd stopping the unit, the shutdown script) goes to the running children once; they get
TRIPLET_SHUTDOWN_GRACE_S to save their progress, the running phases are marked interrupted and the job
exits 143. While the engine runs, a push to the bucket every push-interval.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from building_image_triplet_model import exit_codes
from building_image_triplet_model.io import durable, locks
from building_image_triplet_model.io.progress import utc_now, write_event

from ..exit_codes import TERM_EXIT
from . import checkpoint, publish
from .paths import VMPaths
from .phases import DONE, PHASES, Markers

log = logging.getLogger(__name__)


def exit_status(returncode: int) -> int:
    """Popen reports a child killed by signal N as -N; markers, logs and the job's exit use the shell's
    128+N, so that a SIGTERM that came before the child's own handler was installed reads "interrupted"."""
    return 128 - returncode if returncode < 0 else returncode


class Children:
    """Child processes of the job, and the one SIGTERM they get."""

    def __init__(self, grace_s: float) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopping = threading.Event()
        self.grace_s = grace_s

    def start(self, args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, env=env, cwd=cwd)
        self.procs.append(proc)
        return proc

    def terminate(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Job:
    def __init__(self, paths: VMPaths, s: dict[str, Any], env: dict[str, str]) -> None:
        self.paths, self.s, self.env = paths, s, env
        self.markers = Markers(paths.state_dir)
        self.children = Children(float(env.get("TRIPLET_SHUTDOWN_GRACE_S", "15")))
        self.running: set[str] = set()
        self.scripts = Path(__file__).resolve().parents[2] / "gcp" / "scripts"
        self.python = env.get("TRIPLET_PYTHON", sys.executable)

    # ---- phases
    def phase_valid(self, phase: str) -> bool:
        if phase == "download":
            return (
                self._script("download_archives.sh", *self._download_args(), "--verify-only", quiet=True) == 0
            )
        if phase == "extract":
            if not self.s["extract-archives"]:
                return True
            return (
                self._script("extract_archives.sh", *self._extract_args(), "--verify-only", quiet=True) == 0
            )
        if phase == "preprocess":
            return (
                self.s["mode"] == "worker"
                or Path(self.s["engine"]["output"]).exists()
                or self.markers.is_done("finalize")
            )
        return True

    def should_run(self, phase: str) -> bool:
        if not self.markers.is_done(phase):
            return True
        if self.phase_valid(phase):
            m = self.markers.get(phase)
            log.info("phase %s: done (attempts %s); skipping", phase, m.get("attempts", 0))
            return False
        log.warning("phase %s: marked done but its output is not there any more; running it again", phase)
        return True

    def begin(self, phase: str) -> None:
        attempt = self.markers.start(phase, self.s["run-id"])
        self.running.add(phase)
        log.info("phase %s: start (attempt %d)", phase, attempt)
        self.event("phase", f"phase {phase} started", phase=phase, status="running", attempt=attempt)

    def end(self, phase: str, code: int, summary: dict[str, Any] | None = None) -> int:
        code = exit_status(code)
        status = self.markers.end(phase, code, summary)
        self.running.discard(phase)
        (log.warning if status == "failed" else log.info)("phase %s: %s (exit %d)", phase, status, code)
        self.event(
            "phase",
            f"phase {phase} {status}",
            phase=phase,
            status=status,
            exit_code=code,
            severity="ERROR" if status == "failed" else "INFO",
        )
        return code

    def event(self, name: str, message: str, severity: str = "INFO", **fields: Any) -> None:
        path = os.environ.get("TRIPLET_EVENTS_FILE")
        if not path:
            return
        write_event(
            path,
            name,
            severity,
            source="job",
            message=message,
            run_id=self.s["run-id"],
            preemptions=self.markers.get("preemptions").get("count", 0),
            **fields,
        )

    # ---- children
    def _download_args(self) -> list[str]:
        return ["--manifest", str(self.manifest()), "--dir", str(self.paths.raw_dir)]

    def _extract_args(self) -> list[str]:
        return ["--raw-dir", str(self.paths.raw_dir), "--extract-dir", str(self.paths.extract_dir)]

    def manifest(self) -> Path:
        """The manifest this machine downloads: the run's, or a worker's share of it."""
        full = self.paths.config_dir / "manifest.txt"
        if self.s["mode"] != "worker":
            return full
        from building_image_triplet_model.inputs import manifest, work_split

        mine = work_split.share_entries(
            manifest.load(full, self.paths.repo_dir), (self.s["task-index"], self.s["task-count"])
        )
        share = self.paths.config_dir / "manifest.task.txt"
        durable.write_bytes(share, manifest.render(mine).encode())
        return share

    def _script(self, name: str, *args: str, quiet: bool = False) -> int:
        out = subprocess.DEVNULL if quiet else None
        return subprocess.run(
            ["bash", str(self.scripts / name), *args], env=self.env, stdout=out, stderr=out
        ).returncode

    def start_script(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.children.start(["bash", str(self.scripts / name), *args], self.env)

    def start_engine(self, follow: bool) -> subprocess.Popen[bytes]:
        s = self.s
        args = ["--config", s["engine"]["config"]]
        run_uri = f"{s['checkpoint-uri']}/{s['run-id']}"
        if s["mode"] == "worker":
            args += [
                "--task-index",
                str(s["task-index"]),
                "--task-count",
                str(s["task-count"]),
                "--run-uri",
                run_uri,
            ]
        elif s["mode"] == "merge":
            args += ["--merge", "--run-uri", run_uri, "--wait-timeout-s", str(s["merge-wait-s"])]
        if follow:
            args.append("--follow")
        module = self.env.get("TRIPLET_PROCESSOR_MODULE", "building_image_triplet_model.dataset_processor")
        log.info("preprocess: %s %s", module, " ".join(args))
        env = {**self.env, "PYTHONUNBUFFERED": "1", "HF_HOME": str(self.paths.cache_dir / "huggingface")}
        if s["metadata-cache-sync-uri"]:
            env["METADATA_CACHE_SYNC_URI"] = s["metadata-cache-sync-uri"]
        Path(env["HF_HOME"]).mkdir(parents=True, exist_ok=True)
        proc = self.children.start([self.python, "-m", module, *args], env, cwd=self.paths.repo_dir)
        durable.write_bytes(self.paths.run_dir / "engine.pid", f"{proc.pid}\n".encode())
        return proc

    # ---- the flow
    def complete(self) -> bool:
        """The run is done and every phase it needs still has its output: nothing to do, nothing to push."""
        if not self.markers.is_done(DONE):
            return False
        mode, extract = self.s["mode"], self.s["extract-archives"]
        needed = [
            p
            for p in PHASES
            if not (mode == "merge" and p in ("download", "extract"))
            and not (p == "extract" and not extract)
            and not (mode == "worker" and p == "finalize")
        ]
        return all(self.markers.is_done(p) and self.phase_valid(p) for p in needed)

    def run(self) -> int:
        if self.complete():
            log.info(
                "%s is complete (%s): nothing to do",
                self.s["run-id"],
                self.markers.get(DONE).get("finished_at"),
            )
            return 0 if self.s["on-done"] == "none" else publish.on_done(self.s, self.env)
        if self.s["mode"] == "merge":
            log.info("job: mode merge: no download or extraction (the merge reads the workers' shards)")
            code = self.preprocess(download=None)
        else:
            # Reading the archives in place, the engine embeds each one as soon as it has arrived.
            overlap = not self.s["extract-archives"] and self.should_run("download")
            code = self.preprocess(download=self.start_download()) if overlap else self.sequential()
        if code != 0:
            checkpoint.push(self.s, self.paths, full=False)
            return code
        if self.s["mode"] != "worker" and self.should_run("finalize"):
            self.begin("finalize")
            code, summary = publish.upload_artifact(self.s)
            self.end("finalize", code, summary)
            if code:
                return code
        if not self.markers.is_done(DONE):
            self.markers.update(
                DONE,
                status="done",
                run_id=self.s["run-id"],
                mode=self.s["mode"],
                finished_at=utc_now(),
                finalize=self.markers.get("finalize"),
            )
            self.event("done", f"run {self.s['run-id']} complete", status="done")
            log.info("done: %s complete", self.s["run-id"])
        checkpoint.push(self.s, self.paths, full=False)
        return publish.on_done(self.s, self.env)

    def start_download(self) -> subprocess.Popen[bytes]:
        self.begin("download")
        self.paths.raw_dir.mkdir(parents=True, exist_ok=True)
        self._summary = self.paths.run_dir / "download.summary.json"
        self._summary.unlink(missing_ok=True)
        return self.start_script(
            "download_archives.sh", *self._download_args(), "--summary-json", str(self._summary)
        )

    def end_download(self, code: int) -> int:
        summary = durable.read_json(self._summary) if self._summary.exists() else None
        return self.end("download", code, summary)

    def sequential(self) -> int:
        if not self.s["extract-archives"]:
            # run() found the download done (else it runs beside the engine), and nothing is extracted: a
            # phase that never ran would appear on a second run, and push its marker
            return self.preprocess(download=None)
        for phase, script, args in (
            ("download", "download_archives.sh", self._download_args()),
            ("extract", "extract_archives.sh", self._extract_args()),
        ):
            if not self.should_run(phase):
                continue
            self.begin(phase)
            summary_path = self.paths.run_dir / f"{phase}.summary.json"
            summary_path.unlink(missing_ok=True)
            code = self.start_script(script, *args, "--summary-json", str(summary_path)).wait()
            code = TERM_EXIT if self.children.stopping.is_set() else code
            code = self.end(phase, code, durable.read_json(summary_path) if summary_path.exists() else None)
            checkpoint.push(self.s, self.paths, full=False)
            if code:
                return code
        return self.preprocess(download=None)

    def preprocess(self, download: subprocess.Popen[bytes] | None) -> int:
        if not self.should_run("preprocess"):
            if download is not None:
                return self.end_download(download.wait())
            return 0
        self.begin("preprocess")
        engine = self.start_engine(follow=download is not None)
        pushing = threading.Event()
        pusher = threading.Thread(target=self._push_loop, args=(pushing,), daemon=True)
        pusher.start()
        dl_code: int | None = None
        while engine.poll() is None:
            if download is not None and dl_code is None and download.poll() is not None:
                dl_code = self.end_download(
                    download.returncode if not self.children.stopping.is_set() else TERM_EXIT
                )
                if dl_code:
                    log.warning(
                        "download failed (exit %d): stopping the engine (its progress is kept)", dl_code
                    )
                    engine.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        code = exit_status(engine.returncode)
        stopped_download = False
        if download is not None and dl_code is None:
            if code != 0 and download.poll() is None:
                download.send_signal(signal.SIGTERM)
                stopped_download = True
            dl_code = self.end_download(download.wait() if not self.children.stopping.is_set() else TERM_EXIT)
        pushing.set()
        pusher.join()
        (self.paths.run_dir / "engine.pid").unlink(missing_ok=True)
        if self.children.stopping.is_set():
            code = TERM_EXIT
        log.log(logging.INFO if code == 0 else logging.WARNING, "preprocess: %s", exit_codes.describe(code))
        summary: dict[str, Any] | None = None
        if code == 0 and self.s["mode"] != "worker":
            summary = self.check_complete()
            code = 0 if summary else 1
        code = self.end("preprocess", code, summary)
        if code == 0:
            checkpoint.push(self.s, self.paths, full=True)  # the engine files go before the marker says done
        # The phase that failed first is the run's exit code: a download this job stopped because the
        # engine had failed exits 143, which would hide the engine's reason.
        if dl_code and not stopped_download:
            return dl_code
        return code

    def check_complete(self) -> dict[str, Any] | None:
        h5 = Path(self.s["engine"]["output"])
        module = self.env.get("TRIPLET_STATUS_MODULE", "building_image_triplet_model.preprocess_resume")
        r = subprocess.run(
            [self.python, "-m", module, "--config", self.s["engine"]["config"], "--json"],
            env=self.env,
            cwd=self.paths.repo_dir,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0 or not h5.exists():
            log.warning(
                "preprocess: the engine exited 0 but the status report says work remains (exit %d)",
                r.returncode,
            )
            return None
        return {"artifact": str(h5), "artifact_bytes": h5.stat().st_size}

    def _push_loop(self, done: threading.Event) -> None:
        interval = max(1, int(self.s["push-interval-s"]))
        while not done.wait(interval):
            checkpoint.push(self.s, self.paths, full=True)

    def interrupted(self) -> None:
        """SIGTERM: children get their grace period, running phases are marked interrupted."""
        self.children.stopping.set()
        log.warning(
            "SIGTERM: stopping (phases %s); children get %.0fs to save",
            sorted(self.running) or "none",
            self.children.grace_s,
        )
        self.children.terminate()
        for phase in list(self.running):
            self.markers.update(phase, status="interrupted", ended_at=utc_now(), exit_code=TERM_EXIT)


def run(env: dict[str, str]) -> int:
    """The job, once per machine at a time (a second one exits 0 at once)."""
    from .settings import load

    paths = VMPaths.from_env(env)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    lock = locks.acquire(paths.run_dir / "job.lock")  # held for the process's life
    if lock is None:
        log.info("job: another job holds %s; not starting a second one", paths.run_dir / "job.lock")
        return 0
    durable.write_bytes(paths.run_dir / "job.pid", f"{os.getpid()}\n".encode())
    job = Job(paths, load(paths.config_dir), env)

    def term(_signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        job.interrupted()
        os._exit(TERM_EXIT)

    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGINT, term)
    try:
        return job.run()
    finally:
        (paths.run_dir / "job.pid").unlink(missing_ok=True)
