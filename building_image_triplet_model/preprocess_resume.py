"""What is done and what remains, for a run of the processor: any time, read-only.

    python -m building_image_triplet_model.preprocess_resume --config config.yaml [--json]

Works on an absent, partial, interrupted or running output and never changes a file. Imports no torch.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import embed, geo_knn, index, workdir
from .assemble import MARKER as ASSEMBLE_MARKER
from .assemble import partial_path
from .plan import SPLITS
from .sources import InputError, list_sources

EXIT_COMPLETE = 0
EXIT_CONFIG = 2
EXIT_WORK_REMAINS = 10


def lock_holder(work: Path) -> int | None:
    """The pid of a running processor, or None. Takes and drops a shared lock; creates nothing."""
    try:
        fd = os.open(work / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        raise
    finally:
        os.close(fd)
    return None


def collect(cfg: config_mod.DataConfig) -> dict[str, Any]:
    work = cfg.work
    report: dict[str, Any] = {"output": str(cfg.output), "work_dir": str(work), "steps": {}}
    steps = report["steps"]
    run = workdir.read_json(work / "run.json") or {}
    progress = workdir.read_json(work / "progress.json") or {}
    last = progress.get("steps", {})
    holder = lock_holder(work)
    report["running_pid"] = holder
    report["settings_match"] = None
    if run:
        report["settings_match"] = run.get("settings_fp") == cfg.settings_fp

    # index
    try:
        sources = list_sources(cfg.input_dir)
        input_error = None
    except InputError as exc:
        sources, input_error = [], str(exc)
    names = [s.name for s in sources]
    if cfg.manifest:
        from .work_split import manifest_sources

        names = manifest_sources(cfg.manifest)
    by_name = {s.name: s for s in sources}
    done_idx = []
    rejects: dict[str, int] = {}
    images = 0
    for name in names:
        marker = index.cached_marker(by_name.get(name), work, name)
        if marker:
            done_idx.append(name)
            images += marker["images"]
            for reason, count in marker["rejects"].items():
                rejects[reason] = rejects.get(reason, 0) + count
    report["inputs_match"] = None  # unknown until every archive is indexed
    if run.get("inputs") is not None:
        if sorted(run["inputs"]) != sorted(names):
            report["inputs_match"] = False
        elif len(done_idx) == len(names) and "inputs_fp" in run:
            digests = [[n, index.cached_marker(by_name.get(n), work, n)["digest"]] for n in names]
            report["inputs_match"] = config_mod.fingerprint(digests) == run["inputs_fp"]
    steps["index"] = {
        "status": _status(len(done_idx), len(names)),
        "archives_done": len(done_idx),
        "archives_total": len(names),
        "images_indexed": images,
    }
    if input_error:
        steps["index"]["error"] = input_error

    # plan
    plan = workdir.read_json(work / "plan.json")
    steps["plan"] = {"status": "done" if plan and (work / "plan.npz").exists() else "pending"}
    if plan:
        steps["plan"].update(
            images=plan["images"], targets=plan["targets"], targets_per_split=plan["targets_per_split"]
        )

    # knn
    knn: dict[str, Any] = {"status": "pending", "rows_done": 0, "rows_total": None}
    if plan:
        total = sum(plan["targets_per_split"].values())
        done = sum(geo_knn.rows_done(work / "knn" / s, plan["targets_per_split"][s]) for s in SPLITS)
        knn.update(status=_status(done, total), rows_done=done, rows_total=total)
    steps["knn"] = knn

    # embed
    emb: dict[str, Any] = {"status": "pending", "images_done": 0, "images_total": None}
    if plan:
        done = failed = 0
        complete = 0
        for name, n in plan["source_rows"].items():
            folder = work / "emb" / name
            marker = workdir.read_json(folder / workdir.SUCCESS)
            if marker:
                done += n
                failed += marker.get("failed", 0)
                complete += 1
            else:
                done += sum(b - a for a, b in embed.done_chunks(folder))
        total = plan["images"]
        emb.update(
            status=_status(done, total),
            images_done=done,
            images_total=total,
            archives_complete=complete,
            archives_total=len(plan["source_rows"]),
            decode_failures_in_complete_archives=failed,
        )
    steps["embed"] = emb

    # assemble
    marker = workdir.read_json(work / ASSEMBLE_MARKER) or {}
    asm: dict[str, Any] = {"status": "pending"}
    if cfg.output.exists():
        asm = {"status": "done"}
    elif marker and partial_path(cfg.output).exists():
        asm = {
            "status": "in progress",
            "rows_done": marker.get("rows_done", 0),
            "rows_total": marker.get("rows"),
        }
    steps["assemble"] = asm

    stats = workdir.read_json(cfg.stats_path)
    if stats:
        rejects = stats.get("rejects", rejects)
    report["rejects"] = dict(sorted(rejects.items()))
    report["complete"] = bool(cfg.output.exists() and stats)
    for step, st in steps.items():
        prev = last.get(step, {})
        if prev.get("rate"):
            st["last_rate_per_s"] = prev["rate"]
            st["rate_unit"] = prev.get("unit")
        if prev.get("eta_s") is not None and st["status"] != "done":
            st["last_eta_s"] = prev["eta_s"]
    report["last_run"] = progress.get("run")
    report["next_run"] = _next(report, run)
    return report


def _status(done: int, total: int) -> str:
    if total and done >= total:
        return "done"
    return "in progress" if done else "pending"


def _next(report: dict[str, Any], run: dict[str, Any]) -> str:
    if report["settings_match"] is False:
        return "refuse to resume: the config's settings differ from the existing run's (use --fresh)"
    if report["inputs_match"] is False:
        return "refuse to resume: the input archives differ from the existing run's (use --fresh)"
    if report["complete"]:
        return "nothing: the artifact is complete"
    steps = report["steps"]
    if "error" in steps["index"] and not steps["index"]["archives_total"]:
        return f"fail: {steps['index']['error']}"
    for step in ("index", "plan", "knn", "embed", "assemble"):
        st = steps[step]
        if st["status"] != "done":
            if step == "index":
                what = f"index {st['archives_total'] - st['archives_done']} archive(s)"
            else:
                what = {
                    "plan": "choose the images and splits",
                    "knn": "compute the remaining geographic KNN rows",
                    "embed": "embed the remaining images",
                    "assemble": "assemble the HDF5 artifact",
                }[step]
            return f"{'continue' if st['status'] == 'in progress' else 'start'} at {step}: {what}"
    return "finish the run"


def render(report: dict[str, Any]) -> str:
    lines = [f"output: {report['output']}" + ("  [COMPLETE]" if report["complete"] else "")]
    if report["running_pid"]:
        lines.append(f"a processor is running now (pid {report['running_pid']})")
    for step, st in report["steps"].items():
        detail = {k: v for k, v in st.items() if k != "status"}
        text = ", ".join(f"{k}={v}" for k, v in detail.items())
        lines.append(f"  {step:<9} {st['status']:<12} {text}")
    if report["rejects"]:
        lines.append("rejects: " + ", ".join(f"{k}={v}" for k, v in report["rejects"].items()))
    lines.append(f"next run: {report['next_run']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.preprocess_resume",
        description="Report what the processor has done and what remains (read-only).",
        epilog=(
            f"exit codes: {EXIT_COMPLETE} complete, {EXIT_WORK_REMAINS} work remains, "
            f"{EXIT_CONFIG} configuration error"
        ),
    )
    ap.add_argument("--config", required=True, help="the processor's YAML config")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    report = collect(cfg)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return EXIT_COMPLETE if report["complete"] else EXIT_WORK_REMAINS


if __name__ == "__main__":
    raise SystemExit(main())
