"""A one-page picture of a run, for a person: one self-contained HTML file with inline SVG (no scripts,
no network, opens in any browser).

* a header (config, output, time), progress (done/total, rate, ETA) while a run is incomplete, and the
  totals: images, targets and rejects per split and per archive;
* the targets of every dataset on a map, coloured by split, in a frame that far-off targets cannot
  stretch (they are counted instead), with degree axes and a scale bar;
* the distribution of the KNN distances per split (log scale), with labelled axes and a legend, from the
  artifact or, before it exists, from the KNN chunks done;
* the rejects by reason, and who found them (the index or the decoder);
* per-archive progress of the embeddings.

    python -m building_image_triplet_model.preprocess_resume --config C --html build/run.html

Hand-written SVG rather than a plotting library: two chart kinds (dots, lines) need no more, the page stays
one small self-contained file, and the report needs no new dependency (matplotlib would bring six, and a
font cache to build on a fresh VM) nor its import time.
"""

from __future__ import annotations

import contextlib
import html
import os
from pathlib import Path
from typing import Any

import numpy as np

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.io import durable, workdir
from building_image_triplet_model.io.progress import utc_now
from building_image_triplet_model.io.workdir import Layout
from building_image_triplet_model.report.charts import SPLITS, bars, knn_histogram, map_panels

STATE_COLOURS = {
    "reusable": "#2ca02c",
    "partial": "#ff7f0e",
    "pending": "#bbbbbb",
    "stale": "#d62728",
    "not indexed": "#eeeeee",
}


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _artifact(layout: Layout) -> dict[str, np.ndarray] | None:
    if not layout.output.exists():
        return None
    import h5py

    with h5py.File(layout.output, "r") as f:
        out = {k: f[f"targets/{k}"][()] for k in ("key", "lat", "lon", "split")}
        out["sources"] = f["sources/name"][()]
        for s in SPLITS:
            d = f[f"metadata/knn_distances_geo_{s}"][()].ravel()
            out[f"knn_{s}"], out[f"n_{s}"] = d[:: max(1, len(d) // 100_000)], np.asarray(len(d))
    return out


def _knn_from_work(layout: Layout, knn_key: str | None) -> dict[str, np.ndarray] | None:
    """A run without its artifact yet: the distances of the KNN chunks already computed (any split)."""
    if not knn_key:
        return None
    out = {}
    for s in SPLITS:
        folder = layout.knn_split(knn_key, s)
        parts = []
        for a, b in workdir.ranges_done(folder):
            with contextlib.suppress(durable.CorruptFileError):  # the processor redoes a damaged chunk
                parts.append(durable.read_npz(folder / workdir.range_name(a, b), ("distances",))["distances"])
        d = np.concatenate([p.ravel() for p in parts]) if parts else np.zeros(0, np.float32)
        out[f"knn_{s}"], out[f"n_{s}"] = d[:: max(1, len(d) // 100_000)], np.asarray(len(d))
    return out if any(len(v) for v in out.values()) else None


def _targets_from_plan(layout: Layout) -> dict[str, np.ndarray] | None:
    if not layout.plan.exists():
        return None
    try:
        p = durable.read_npz(layout.plan, ("target_keys", "target_lat", "target_lon", "target_split"))
    except durable.CorruptFileError:
        return None
    return {
        "key": p["target_keys"],
        "lat": p["target_lat"],
        "lon": p["target_lon"],
        "split": p["target_split"],
    }


def _table(head: list[str], rows: list[list[Any]], cls: str) -> str:
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def header(cfg_path: str | None, report: dict[str, Any], when: str) -> str:
    state = "complete" if report["complete"] else "not complete"
    if report.get("running_pid"):
        state += f"; a processor is running now (pid {report['running_pid']})"
    rows = [
        ("config", cfg_path or "(given as settings)"),
        ("output", report["output"]),
        ("work folder", report["work_dir"]),
        (
            "embeddings",
            report["embeddings_dir"] + (" (shared folder)" if report.get("embeddings_shared") else ""),
        ),
        ("report made", when),
        ("state", state),
        ("next run", report["next_run"]),
    ]
    items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in rows)
    return f"<h1>{_esc(Path(report['output']).name)}</h1><dl class='meta'>{items}</dl>"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return (
        f"{seconds:.0f} s"
        if seconds < 90
        else f"{seconds / 60:.1f} min"
        if seconds < 5400
        else f"{seconds / 3600:.1f} h"
    )


STEP_COUNTS = {  # the step's done and total in the report, and what they count
    "index": ("archives_done", "archives_total", "archives"),
    "knn": ("rows_done", "rows_total", "targets"),
    "embed": ("images_done", None, "images"),
}


def progress_section(report: dict[str, Any]) -> str:
    """Done/total, rate and ETA per step (the rate and ETA the running or last run recorded)."""
    rows = []
    for step, st in report["steps"].items():
        done_key, total_key, unit = STEP_COUNTS.get(step, (None, None, ""))
        done = st.get(done_key) if done_key else None
        total = st.get(total_key) if total_key else None
        if step == "embed":
            total = st["images_done"] + st["images_to_embed"]
        count = f"{done} / {total} {unit}" if done is not None and total is not None else ""
        rate = st.get("last_rate_per_s")
        unit_r = st.get("rate_unit") or "items"
        rate_text = (
            "" if not rate else f"{rate / 1e6:.1f} MB/s" if unit_r == "bytes" else f"{rate:.1f} {unit_r}/s"
        )
        rows.append([step, st["status"], count, rate_text, _eta(st.get("last_eta_s"))])
    return "<h2>Progress</h2>" + _table(["step", "status", "done / total", "rate", "ETA"], rows, "progress")


def totals_section(report: dict[str, Any]) -> str:
    """Images, targets and rejects per split and per archive."""
    splits = report.get("splits")
    rejected = sum(report.get("rejects", {}).values())
    if splits:
        rows = [[s, v["targets"], v["images"], ""] for s, v in splits.items()]
        rows.append(["rejected (in no split)", "", "", rejected])
        rows.append(
            [
                "total",
                sum(v["targets"] for v in splits.values()),
                sum(v["images"] for v in splits.values()),
                rejected,
            ]
        )
        per_split = _table(["split", "targets", "images", "rejects"], rows, "splits")
    else:
        per_split = (
            f"<p>no plan yet: splits are chosen once every archive is indexed ({rejected} rejects so far)</p>"
        )
    rows = []
    for name, a in report["archives"].items():
        if a["state"] == "not indexed":
            rows.append([name, "", "", "", "", "", a["state"], ""])
            continue
        rows.append(
            [
                name,
                a["indexed"],
                a["targets"],
                a["rejected"],
                a["images"],
                a["images"] - a["to_embed"],
                a["state"],
                ", ".join(a.get("shared_with", [])) or ("no" if report.get("embeddings_shared") else ""),
            ]
        )
    head = [
        "archive",
        "images indexed",
        "targets",
        "rejects",
        "images in the output",
        "embedded",
        "embeddings",
        "store shared with",
    ]
    return f"<h2>Totals</h2>{per_split}{_table(head, rows, 'archives')}"


def render(
    cfg: DataConfig, report: dict[str, Any], cfg_path: str | None = None, when: str | None = None
) -> str:
    layout = Layout(cfg)
    art = _artifact(layout) if report["complete"] else None
    targets = art or _targets_from_plan(layout)
    knn = art or _knn_from_work(layout, report.get("knn_key"))
    parts = [header(cfg_path, report, when or utc_now())]
    if not report["complete"]:
        parts.append(progress_section(report))
    parts.append(totals_section(report))
    parts.append(
        map_panels(targets) if targets is not None else "<h2>Targets by split</h2><p>no plan yet</p>"
    )
    if knn is not None:
        parts.append(knn_histogram(knn))
    by = report.get("rejects_found_by", {})
    rows = [
        (f"{reason} ({who})", n, "#8c564b" if who == "index" else "#9467bd")
        for who in ("index", "decoder")
        for reason, n in sorted(by.get(who, {}).items())
    ]
    parts.append(bars("Rejects by reason (who found them)", rows))
    arch = [
        (f"{name}: {a['state']}", a.get("images", 0) - a.get("to_embed", 0), STATE_COLOURS[a["state"]])
        for name, a in report["archives"].items()
    ]
    total = max((a.get("images", 0) for a in report["archives"].values()), default=0)
    parts.append(bars("Embeddings per archive (images embedded of those needed)", arch, total))
    style = (
        "body{font-family:sans-serif;margin:2em}.maps{display:flex;flex-wrap:wrap;gap:8px}"
        "figure.map{margin:0}figcaption{font-size:11px}"
        "dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dt{font-weight:bold}"
        "dd{margin:0}table{border-collapse:collapse;margin:6px 0 12px}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}"
    )
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_esc(layout.output.name)}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write(
    cfg: DataConfig,
    report: dict[str, Any],
    path: str | Path,
    cfg_path: str | None = None,
    when: str | None = None,
) -> Path:
    """Write the page; returns the path written (absolute)."""
    path = Path(os.path.abspath(path))
    durable.write_bytes(path, render(cfg, report, cfg_path, when).encode())
    return path
