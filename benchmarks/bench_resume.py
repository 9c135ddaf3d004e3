"""Benchmark: resuming after a SIGKILL.

(a) A real run is killed with SIGKILL (its whole process group, decode workers included) once ~90 % of
    its images are embedded; the processor is then started again as a new process (interpreter and imports
    included) and we measure, from the moment the parent starts that process: the imports (engine, torch,
    timm), the preflight, "work starts" (the model is ready: the backbone's log line), and its first new
    batch (Hooks.on_batch), then the time to completion. The state is never made by hand: each repeat kills
    its own real run.
(b) Kill cost: a run is killed with SIGKILL in the middle of the embedding step, at a different phase of
    the chunk interval in each repeat; the images embedded before the kill (Hooks.on_batch, printed by the
    process as it goes) minus the images durable in the embedding stores after it (chunk files) are the
    images the next run embeds again. The first repeat's next run is run to completion to check that it
    embeds exactly the images that were not durable.

The processor runs through benchmarks/processor_runner.py (pipeline.execute as dataset_processor.main
calls it, plus Hooks and log handlers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    Bench,
    LineWatcher,
    archives,
    data_config,
    images_in,
    link_archives,
    run_processor,
    start_runner,
    stat,
    tars,
    write_config,
)


def durable_rows(work: Path) -> int:
    """Rows in the embedding stores' chunk files (each chunk: its ``rows`` array)."""
    total = 0
    for p in work.glob("emb/*/*/*-*.npz"):
        with contextlib.suppress(Exception), np.load(p) as z:
            total += len(z["rows"])
    return total


def kill_at(
    cfg: Path, report: Path, when: Any, timeout: float = 900
) -> tuple[int, float, list[tuple[int, float]], bool]:
    """Start the processor, call when(batches) after each batch; SIGKILL its process group once it says
    so. Returns (images embedded before the kill, kill time, the batches seen, finished-before-kill)."""
    proc, t0 = start_runner(cfg, report, "--print-batches", stdout=subprocess.PIPE)
    watcher = LineWatcher(proc.stdout, "BATCH ")
    watcher.start()
    seen: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        last = watcher.last
        if last:
            _, done, t = last.split()
            if not seen or seen[-1][0] != int(done):
                seen.append((int(done), float(t)))
        if seen and when(seen, time.monotonic() - t0):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            # A batch line that was on its way is still counted: read what the pipe holds.
            watcher.join(2)
            last = watcher.last
            if last and int(last.split()[1]) != seen[-1][0]:
                seen.append((int(last.split()[1]), float(last.split()[2])))
            return seen[-1][0], time.monotonic() - t0, seen, False
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError("the run never reached the kill point")
    return (seen[-1][0] if seen else 0), time.monotonic() - t0, seen, True


def resume_part(bench: Bench, folder: Path, total: int, interval: float) -> None:
    phases: dict[str, list[float]] = {}
    durable_fraction, remaining, embedded = [], [], []
    for r in range(bench.repeats):
        out = bench.scratch / f"resume{r}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = write_config(
            out / "c.yaml", data_config(folder, out, embedding_chunk_interval_s=interval, knn_k=10)
        )
        done, _, _, finished = kill_at(cfg, out / "killed.json", lambda seen, _t: seen[-1][0] >= 0.9 * total)
        if finished:
            raise RuntimeError("the run finished before 90 %")
        work = out / "d.work"
        durable = durable_rows(work)
        durable_fraction.append(durable / total)
        res = run_processor(cfg, out / "resume.json")
        tl = res.timeline
        assert res.stats is not None
        remaining.append(total - durable)
        embedded.append(res.stats["images_embedded"])
        steps = {
            "interpreter_start_s": tl["interpreter_ready"],
            "engine_import_s": tl["engine_imported"] - tl["interpreter_ready"],
            "torch_import_s": tl["torch_imported"] - tl["engine_imported"],
            "timm_import_s": tl["timm_imported"] - tl["torch_imported"],
            "config_and_preflight_s": tl["processor_started"] - tl["timm_imported"],
            "run_start_to_model_ready_s": tl["model_ready"] - tl["processor_started"],
            "model_ready_to_first_new_batch_s": tl["first_batch"] - tl["model_ready"],
            "process_start_to_model_ready_s": tl["model_ready"],
            "process_start_to_first_new_batch_s": tl["first_batch"],
            "process_start_to_complete_s": res.wall_s,
        }
        for k, v in steps.items():
            phases.setdefault(k, []).append(v)
        bench.log(
            f"resume {r + 1}: killed at {done}/{total} embedded ({durable} durable); first new batch "
            f"{tl['first_batch']:.2f} s after process start (model ready {tl['model_ready']:.2f} s)"
        )
    for k, v in phases.items():
        bench.figures[f"resume_{k}"] = stat(v, "s", 3)
    bench.figures["resume_durable_fraction_at_kill"] = stat(durable_fraction, "fraction", 3)
    bench.figures["resume_images_remaining"] = stat(remaining, "images", 0)
    bench.figures["resume_images_embedded_by_resume"] = stat(embedded, "images", 0)
    f = bench.figures
    bench.summary.append(
        "resume of a ~90 % complete run: first new batch "
        f"{f['resume_process_start_to_first_new_batch_s']['median']:.2f} "
        f"s after the process starts; work starts (model ready) at "
        f"{f['resume_process_start_to_model_ready_s']['median']:.2f} s, of which imports: torch "
        f"{f['resume_torch_import_s']['median']:.2f} s, timm {f['resume_timm_import_s']['median']:.2f} s, "
        "engine "
        f"{f['resume_engine_import_s']['median']:.2f} s; the run itself (index check, plan, KNN, model load) "
        f"{f['resume_run_start_to_model_ready_s']['median']:.2f} s; model ready to first batch "
        f"{f['resume_model_ready_to_first_new_batch_s']['median']:.2f} s"
    )
    if remaining != embedded:
        bench.summary.append(f"WARNING: the resumes embedded {embedded} images, {remaining} were not durable")


def kill_cost_part(bench: Bench, folder: Path, total: int, interval: float) -> None:
    phases = [round((i + 0.5) / bench.repeats, 3) for i in range(bench.repeats)]  # spread over an interval
    redone, redone_s, rates, checks = [], [], [], []
    for r, phase in enumerate(phases):
        out = bench.scratch / f"kill{r}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = write_config(
            out / "c.yaml", data_config(folder, out, embedding_chunk_interval_s=interval, knn_k=10)
        )
        target = (1 + phase) * interval  # after the first chunk flush, somewhere in the second interval

        def when(seen: list[tuple[int, float]], _t: float, target: float = target) -> bool:
            return seen[-1][1] - seen[0][1] >= target

        done, _, seen, finished = kill_at(cfg, out / "killed.json", when)
        if finished:
            raise RuntimeError("the run finished before the kill: give it more images")
        durable = durable_rows(out / "d.work")
        rate = (seen[-1][0] - seen[0][0]) / max(1e-9, seen[-1][1] - seen[0][1])
        redone.append(done - durable)
        rates.append(rate)
        redone_s.append((done - durable) / rate)
        bench.log(
            f"kill {r + 1} at {phase:.2f} of an interval: {done} embedded, {durable} durable, "
            f"{done - durable} to embed again ({(done - durable) / rate:.2f} s of work at {rate:.0f} img/s)"
        )
        if r == 0 and not bench.quick:  # the check costs a process: full mode only
            res = run_processor(cfg, out / "resume.json")
            assert res.stats is not None
            checks.append(
                {
                    "embedded_before_kill": done,
                    "durable_after_kill": durable,
                    "images_needed": total,
                    "embedded_by_next_run": res.stats["images_embedded"],
                    "embedded_twice": done + res.stats["images_embedded"] - total,
                }
            )
    bench.figures["kill_embedding_chunk_interval_s"] = interval
    bench.figures["kill_images_embedded_again"] = stat(redone, "images", 0)
    bench.figures["kill_seconds_of_work_embedded_again"] = stat(redone_s, "s", 3)
    bench.figures["kill_embed_rate_images_per_s"] = stat(rates, "images/s", 1)
    bench.figures["kill_phase_of_interval"] = phases
    bench.figures["kill_next_run_check"] = checks
    worst = max(redone_s)
    bench.summary.append(
        f"kill cost with embedding_chunk_interval_s={interval:g}: median "
        f"{bench.figures['kill_images_embedded_again']['median']:.0f} images "
        f"({bench.figures['kill_seconds_of_work_embedded_again']['median']:.2f} s of work) embedded again, "
        f"worst {worst:.2f} s: {'within' if worst <= interval else 'MORE than'} one interval"
    )
    if (
        checks
        and checks[0]["embedded_twice"] != checks[0]["embedded_before_kill"] - checks[0]["durable_after_kill"]
    ):
        bench.summary.append(f"WARNING: the next run's count does not match: {checks[0]}")


def main() -> None:
    bench = Bench.from_args("resume", repeats=3, quick_repeats=1)
    small = archives("small", 5, 60 if bench.quick else 250, pool=32)
    counts = images_in(small)
    paths = tars(small)
    four = link_archives(paths[:4], bench.scratch / "input4")
    # The kills come up to two intervals after the first batch: the run must outlast that with room to
    # spare on a fast machine (370 img/s here: ~25 s of embedding).
    kill_set = archives("kill", 8, 60 if bench.quick else 250, pool=32)
    kill_counts = images_in(kill_set)
    resume_interval = 2.0
    kill_interval = 2.0 if bench.quick else 5.0
    bench.settings = {
        "model": "resnet18 (random weights) at 64 px, CPU, fp32, batch 32, default decode workers/threads",
        "resume_input": f"4 generated archives, {sum(counts[p.stem] for p in paths[:4])} images",
        "resume_embedding_chunk_interval_s": resume_interval,
        "kill_input": f"8 generated archives, {sum(kill_counts.values())} images",
        "kill_embedding_chunk_interval_s": kill_interval,
        "repeats": bench.repeats,
    }
    resume_part(bench, four, sum(counts[p.stem] for p in paths[:4]), resume_interval)
    kill_input = link_archives(tars(kill_set), bench.scratch / "input_kill")
    kill_cost_part(bench, kill_input, sum(kill_counts.values()), kill_interval)
    bench.notes += [
        "Times are from the parent's clock just before it starts the process (CLOCK_MONOTONIC is one clock "
        "for all processes), so they include the interpreter's start and every import.",
        "torch and timm are imported explicitly first (processor_runner.py) to split their cost from the "
        "run's; the engine itself imports them in its preflight, so the sum is the same.",
        "A kill loses the embeddings not yet in a chunk file: at most the writer's buffer (embedding_chunk_"
        "interval_s of work) plus the batches on their way to it; the batch in the model is not counted as "
        "embedded (it never reached on_batch).",
    ]
    bench.write()


if __name__ == "__main__":
    main()
