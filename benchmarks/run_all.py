"""Run every benchmark, each in its own process, then render README.md beside their JSON files.

    python benchmarks/run_all.py                  # every benchmark -> build/bench/results/
    python benchmarks/run_all.py --quick          # small sizes, proves each runs: build/bench/quick/results/
    python benchmarks/run_all.py --only knn,index # some of them (the others' files are kept)
    python benchmarks/run_all.py --render DIR     # only render DIR/README.md from DIR/*.json

Nothing tracked is written: ``make bench-record`` copies a finished run into benchmarks/results/. A
benchmark that fails is reported and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import QUICK_RESULTS, RESULTS, load_average, machine  # noqa: E402

BENCHES = [
    "index",
    "knn",
    "datapath",
    "truncated",
    "pipeline",
    "resume",
    "incremental",
    "overlap",
    "bootstrap",
    "gpu",
]
SCRIPTS = {name: f"bench_{name}.py" for name in BENCHES} | {"gpu": "gpu.py"}


def cuda_available() -> bool:
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() == "True"


# ------------------------------------------------------------------------------------------- rendering
def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def _is_stat(v: Any) -> bool:
    return isinstance(v, dict) and "median" in v and "values" in v


def render_one(doc: dict[str, Any]) -> list[str]:
    m = doc.get("machine", {})
    quick = " (QUICK: small sizes, figures only prove that it runs)" if doc.get("quick") else ""
    lines = [
        f"## {doc['name']}{quick}",
        "",
        f"Measured {doc.get('measured')} in {doc.get('duration_s')} s; repeats: {doc.get('repeats')} (each "
        f"figure is their median); {m.get('cores')} cores, {m.get('cpu')}, {m.get('memory_gb')} GB, "
        f"torch {m.get('torch')}"
        + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"; load average before {doc.get('load_before')}, after {doc.get('load_after')}.",
        "",
    ]
    for s in doc.get("summary", []):
        lines.append(f"* {s}")
    if doc.get("summary"):
        lines.append("")
    stats = {k: v for k, v in doc.get("figures", {}).items() if _is_stat(v)}
    other = {k: v for k, v in doc.get("figures", {}).items() if not _is_stat(v)}
    if stats:
        lines += ["| figure | median | unit | n | min - max |", "| --- | ---: | --- | ---: | --- |"]
        for k, v in stats.items():
            lines.append(
                f"| {k} | **{_value(v['median'])}** | {v.get('unit', '')} | {v.get('n')} | "
                f"{_value(v.get('min'))} - {_value(v.get('max'))} |"
            )
        lines.append("")
    for k, v in list(other.items()):
        if isinstance(v, dict) and "measured" in v and "estimated" in v:  # a sum of steps
            lines += [
                f"**{k}**: {v.get('total_s')} s = {v.get('measured_s')} s measured + "
                f"{v.get('estimated_s')} s estimated",
                "",
                "| step | seconds | |",
                "| --- | ---: | --- |",
            ]
            lines += [f"| {step} | {_value(sec)} | measured |" for step, sec in v["measured"].items()]
            lines += [f"| {step} | {_value(sec)} | estimated |" for step, sec in v["estimated"].items()]
            lines.append("")
            del other[k]
    for k, v in other.items():
        text = json.dumps(v) if not isinstance(v, str | int | float) else _value(v)
        if len(text) > 400:
            text = text[:400] + "..."
        lines.append(f"* `{k}`: {text}")
    if other:
        lines.append("")
    if doc.get("not_measured"):
        lines.append("Not measured here:")
        lines += [f"* `{k}`: {v}" for k, v in doc["not_measured"].items()]
        lines.append("")
    for note in doc.get("notes", []):
        lines.append(f"> {note}")
        lines.append("")
    return lines


def render(folder: Path) -> str:
    docs = []
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue
        if "figures" in doc and "name" in doc:
            docs.append(doc)
    order = {n: i for i, n in enumerate([*BENCHES, "gpu_small_cpu"])}
    docs.sort(key=lambda d: order.get(d["name"], 99))
    runs = json.loads((folder / "run_all.json").read_text()) if (folder / "run_all.json").exists() else {}
    head = [
        "# Benchmark results",
        "",
        "Written by `make bench` (benchmarks/run_all.py) into build/bench/results/, and copied here by "
        "`make bench-record`. One JSON file per benchmark beside this file holds every repeat's value, the "
        "machine and the load average before and after. No test asserts a time.",
        "",
    ]
    if runs:
        head += [
            f"Run: {runs.get('started')} to {runs.get('ended')} ({runs.get('seconds')} s), quick: "
            f"{runs.get('quick')}; machine: {json.dumps(runs.get('machine'))}.",
            "",
        ]
        failed = [r["name"] for r in runs.get("benchmarks", []) if r.get("rc") != 0]
        if failed:
            head += [f"**Failed:** {', '.join(failed)} (see their output).", ""]
    body: list[str] = []
    for doc in docs:
        body += render_one(doc)
    return "\n".join(head + body).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- running
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated names: " + ",".join(BENCHES))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--render", type=Path, default=None, help="only render this folder's README.md")
    args = ap.parse_args()
    if args.render:
        (args.render / "README.md").write_text(render(args.render))
        return 0
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    names = [n for n in args.only.split(",") if n] or BENCHES
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmarks: {unknown}")
    if not args.only and out.exists():
        shutil.rmtree(out)  # a full run replaces the previous one: no stale figures beside new ones
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "machine": machine(),
        "load_before": load_average(),
        "benchmarks": [],
    }
    t_all = time.monotonic()
    for name in names:
        cmd = [sys.executable, str(HERE / SCRIPTS[name]), "--out", str(out)]
        if name == "gpu":
            cmd += ["--quick"] if args.quick else ([] if cuda_available() else ["--small"])
        elif args.quick:
            cmd.append("--quick")
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, cwd=HERE.parent, check=False).returncode
        seconds = round(time.monotonic() - t0, 1)
        record["benchmarks"].append({"name": name, "rc": rc, "seconds": seconds})
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds} s", flush=True)
    record.update(
        ended=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        seconds=round(time.monotonic() - t_all, 1),
        load_after=load_average(),
    )
    (out / "run_all.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "README.md").write_text(render(out))
    print(f"\nresults: {out}/ (README.md, *.json)")
    for r in record["benchmarks"]:
        print(f"  {r['name']:<12} {'ok' if r['rc'] == 0 else 'FAILED':<7} {r['seconds']:>7} s")
    return 0 if all(r["rc"] == 0 for r in record["benchmarks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
