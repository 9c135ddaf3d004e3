"""Benchmark: "pay only for what changed".

1. A complete run over 4 archives; then a 5th archive is added to input_dir and the processor runs again.
   Its images_embedded (<stem>.stats.json) must equal the new archive's images, and its wall time is
   compared with the new archive's own cost: a from-scratch run over that archive alone (fresh output: its
   index, plan, KNN, embedding and artifact), the same process start and imports. Target ratio <= 1.1.
2. On the complete 5-archive run: knn_k changed, and separately val_size changed: nothing may be embedded
   again; wall time (target: under a minute).

Every run is a real process (benchmarks/processor_runner.py: pipeline.execute as dataset_processor.main
calls it), timed from the parent's start of it. The complete states the repeats start from are real runs'
output, copied (shutil.copytree) before each repeat, so every repeat starts from the same state.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from common import (
    Bench,
    RunnerResult,
    archives,
    data_config,
    images_in,
    link_archives,
    run_processor,
    stat,
    tars,
    write_config,
)


def breakdown(res: RunnerResult) -> dict[str, float]:
    tl = res.timeline
    embed = tl["last_batch"] - tl["model_ready"] if "last_batch" in tl and "model_ready" in tl else 0.0
    return {
        "wall_s": res.wall_s,
        "imports_s": tl.get("timm_imported", 0.0),
        "run_s": tl["execute_ended"] - tl["execute_started"],
        "embedding_s": embed,
    }


def run_state(base: Path, run: Path, data: dict[str, Any], report: str) -> RunnerResult:
    """Copy a complete state to the run folder (same path every repeat), then run the processor on it."""
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run, symlinks=True)
    cfg = write_config(run / "c.yaml", data)
    return run_processor(cfg, run / report)


def main() -> None:
    bench = Bench.from_args("incremental", repeats=3, quick_repeats=1)
    small = archives("small", 5, 60 if bench.quick else 250, pool=32)
    counts = images_in(small)
    paths = tars(small)
    new = paths[4]
    work = bench.scratch
    data_in = work / "input"
    run = work / "run"
    bench.settings = {
        "model": "resnet18 (random weights) at 64 px, CPU, fp32, batch 32, default decode workers/threads",
        "archives": {p.stem: counts[p.stem] for p in paths},
        "new_archive": new.stem,
        "repeats": bench.repeats,
        "embedding_chunk_interval_s": 60,
    }

    def data(**kw: Any) -> dict[str, Any]:
        return data_config(data_in, run, embedding_chunk_interval_s=60, knn_k=10, **kw)

    # The complete 4-archive state, made once by a real run at the run folder's path, kept as base4/.
    shutil.rmtree(data_in, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    link_archives(paths[:4], data_in)
    cfg = write_config(run / "c.yaml", data())
    first = run_processor(cfg, run / "first.json")
    bench.figures["first_run_4_archives_wall_s"] = round(first.wall_s, 2)
    base4 = work / "base4"
    shutil.rmtree(base4, ignore_errors=True)
    run.rename(base4)
    link_archives([new], data_in)

    incr: list[dict[str, float]] = []
    embedded: list[int] = []
    for r in range(bench.repeats):
        res = run_state(base4, run, data(), "incremental.json")
        assert res.stats is not None
        incr.append(breakdown(res))
        embedded.append(int(res.stats["images_embedded"]))
        bench.log(f"incremental {r + 1}: {res.wall_s:.2f} s, {embedded[-1]} images embedded")
    base5 = work / "base5"
    shutil.rmtree(base5, ignore_errors=True)
    run.rename(base5)  # the last incremental run's complete 5-archive state

    # The new archive's own cost: a from-scratch run over it alone.
    alone_in = link_archives([new], work / "input_new_only")
    alone: list[dict[str, float]] = []
    for r in range(bench.repeats):
        out = work / "alone"
        shutil.rmtree(out, ignore_errors=True)
        cfg = write_config(
            out / "c.yaml", data_config(alone_in, out, embedding_chunk_interval_s=60, knn_k=10)
        )
        res = run_processor(cfg, out / "alone.json")
        assert res.stats is not None and res.stats["images_embedded"] == counts[new.stem]
        alone.append(breakdown(res))
        bench.log(f"new archive alone {r + 1}: {res.wall_s:.2f} s")

    changes: dict[str, list[dict[str, float]]] = {"knn_k": [], "val_size": []}
    change_embedded: dict[str, list[int]] = {"knn_k": [], "val_size": []}
    for r in range(bench.repeats):
        for key, value in (("knn_k", 20), ("val_size", 0.2)):
            d = data()
            d[key] = value
            res = run_state(base5, run, d, f"{key}.json")
            assert res.stats is not None
            changes[key].append(breakdown(res))
            change_embedded[key].append(int(res.stats["images_embedded"]))
            bench.log(f"{key} change {r + 1}: {res.wall_s:.2f} s, {change_embedded[key][-1]} images embedded")

    f = bench.figures
    for label, rows in (("incremental", incr), ("new_archive_alone", alone)):
        for k in rows[0]:
            f[f"{label}_{k}"] = stat([row[k] for row in rows], "s", 3)
    f["incremental_images_embedded"] = embedded
    f["new_archive_images"] = counts[new.stem]
    f["incremental_over_new_archive_alone_wall"] = round(
        f["incremental_wall_s"]["median"] / f["new_archive_alone_wall_s"]["median"], 3
    )
    f["incremental_over_new_archive_alone_run"] = round(
        f["incremental_run_s"]["median"] / f["new_archive_alone_run_s"]["median"], 3
    )
    for key, rows in changes.items():
        for k in rows[0]:
            f[f"{key}_change_{k}"] = stat([row[k] for row in rows], "s", 3)
        f[f"{key}_change_images_embedded"] = change_embedded[key]
    ok = all(e == counts[new.stem] for e in embedded)

    def m(key: str) -> float:
        return float(f[key]["median"])

    bench.summary.append(
        f"adding one archive ({counts[new.stem]} images) to 4: the run embedded {embedded} images "
        f"({'= the new archive' if ok else 'NOT the new archive count'}), {m('incremental_wall_s'):.2f} s "
        f"wall against {m('new_archive_alone_wall_s'):.2f} s for the new archive alone from scratch: "
        f"ratio {f['incremental_over_new_archive_alone_wall']} (target <= 1.1); without the process start "
        f"and imports {m('incremental_run_s'):.2f} s vs {m('new_archive_alone_run_s'):.2f} s: "
        f"{f['incremental_over_new_archive_alone_run']}"
    )
    for key in changes:
        w = f[f"{key}_change_wall_s"]["median"]
        bench.summary.append(
            f"{key} changed on the complete run: {change_embedded[key]} images embedded, {w:.2f} s wall "
            f"({'under' if w < 60 else 'OVER'} a minute), of which {m(f'{key}_change_imports_s'):.2f} s "
            f"process start and imports, {m(f'{key}_change_run_s'):.2f} s the run"
        )
    bench.notes += [
        "wall_s: from the parent starting the process to its exit; imports_s: until torch and timm are "
        "imported; run_s: pipeline.execute; embedding_s: model ready to the last batch.",
        "The new archive alone is the cost of embedding that archive from scratch plus its own cheap steps "
        "(index, plan, KNN, artifact), in a fresh output folder.",
    ]
    bench.write()


if __name__ == "__main__":
    main()
