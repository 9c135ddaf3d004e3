"""Run every benchmark (each in its own process) and render benchmarks/results/README.md."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_index.py", "bench_datapath.py", "bench_pipeline.py", "bench_knn.py", "bench_resume.py"]


def render() -> str:
    rows = ["| benchmark | figure | value |", "| --- | --- | --- |"]
    machines = set()
    gpu_rows: list[str] = []
    for path in sorted((HERE / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        if "forward_only" in doc:  # benchmarks/gpu.py
            gpu_rows.append(f"### {path.name}: {doc['device']}, torch {doc['torch']}")
            gpu_rows += [
                "",
                "| model | size | precision | batch | compile | channels_last | images/s |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            gpu_rows += [
                f"| {r['model']} | {r['size']} | {r['precision']} | {r['batch']} | {r['compile']} | "
                f"{r.get('channels_last', '-')} | {r['images_per_s']} |"
                for r in doc["forward_only"]
            ]
            gpu_rows += ["", f"Pipeline vs forward-only: `{json.dumps(doc.get('pipeline'))}`", ""]
            continue
        m = doc["machine"]
        machines.add(f"{m.get('cores')} cores, {m.get('cpu')}, {m.get('device', 'cpu')} ({doc['measured']})")
        for key, value in doc["figures"].items():
            rows.append(f"| {doc['name']} | {key} | {value} |")
    head = [
        "# Benchmark results",
        "",
        "Written by `make bench` (benchmarks/run_all.py); one JSON file per benchmark beside this file.",
        "",
        "Machines: " + "; ".join(sorted(machines)),
        "",
    ]
    return "\n".join(head + rows + (["", *gpu_rows] if gpu_rows else [])) + "\n"


def main() -> int:
    only = sys.argv[1:] or BENCHES
    for name in only:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / name)], cwd=HERE, check=True)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    (HERE / "results" / "README.md").write_text(render())
    print((HERE / "results" / "README.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
