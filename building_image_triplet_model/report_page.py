"""A one-page picture of a run, for a person: one self-contained HTML file with inline SVG (no scripts,
no network, opens in any browser).

* the targets of every archive on a map, coloured by split;
* the distribution of the KNN distances per split (log scale);
* the rejects by reason, and who found them (the index or the decoder);
* per-archive progress of the embeddings.

    python -m building_image_triplet_model.preprocess_resume --config C --html run.html
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from . import durable
from .config import DataConfig
from .workdir import Layout

SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
SPLITS = tuple(SPLIT_COLOURS)
STATE_COLOURS = {
    "reusable": "#2ca02c",
    "partial": "#ff7f0e",
    "pending": "#bbbbbb",
    "stale": "#d62728",
    "not indexed": "#eeeeee",
}
MAX_POINTS_PER_PANEL = 1500


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
            out[f"knn_{s}"] = d[:: max(1, len(d) // 100_000)]
    return out


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


def map_panels(t: dict[str, np.ndarray], width: int = 220) -> str:
    """One small map per dataset (the key's DatasetID part): each archive is one region of one city."""
    dataset = t["key"] // 1_000_000_000
    panels = []
    for d in np.unique(dataset):
        sel = np.flatnonzero(dataset == d)
        sel = sel[:: max(1, -(-len(sel) // MAX_POINTS_PER_PANEL))]  # ceil: never more than the cap
        lat, lon, split = t["lat"][sel], t["lon"][sel], t["split"][sel]
        kx = math.cos(math.radians(float(np.mean(lat))))  # equirectangular, true to scale at the centre
        x0, x1 = float(lon.min()) * kx, float(lon.max()) * kx
        y0, y1 = float(lat.min()), float(lat.max())
        span = max(x1 - x0, y1 - y0, 1e-6)
        pad = 8
        scale = (width - 2 * pad) / span
        dots = "".join(
            f'<circle cx="{pad + (lo * kx - x0) * scale:.1f}" '
            f'cy="{width - pad - (la - y0) * scale:.1f}" r="2" '
            f'fill="{SPLIT_COLOURS[SPLITS[int(s)]]}"/>'
            for la, lo, s in zip(lat.tolist(), lon.tolist(), split.tolist(), strict=True)
        )
        km = span * 111.32  # degrees of latitude (and of scaled longitude) to kilometres
        panels.append(
            f'<figure class="map"><svg width="{width}" height="{width}" viewBox="0 0 {width} {width}" '
            f'role="img" aria-label="targets of dataset {int(d)}">'
            '<rect width="100%" height="100%" fill="#fafafa"/>'
            f"{dots}</svg><figcaption>dataset {int(d)}: {len(np.flatnonzero(dataset == d))} targets, "
            f"{km:.1f} km across</figcaption></figure>"
        )
    legend = " ".join(f'<span style="color:{c}">&#9679; {s}</span>' for s, c in SPLIT_COLOURS.items())
    return f"<h2>Targets by split</h2><p>{legend}</p><div class='maps'>{''.join(panels)}</div>"


def knn_histogram(a: dict[str, np.ndarray], width: int = 640, height: int = 220) -> str:
    values = [a[f"knn_{s}"] for s in SPLITS if len(a[f"knn_{s}"])]
    if not values:
        return "<h2>KNN distances</h2><p>no neighbours (splits of one target)</p>"
    allv = np.concatenate(values)
    lo, hi = max(float(allv[allv > 0].min()) if (allv > 0).any() else 0.1, 0.1), max(float(allv.max()), 1.0)
    edges = np.logspace(math.log10(lo), math.log10(hi) + 1e-9, 41)
    lines = []
    peak = 1
    hists = {}
    for s in SPLITS:
        h, _ = np.histogram(np.clip(a[f"knn_{s}"], lo, hi), bins=edges)
        hists[s] = h
        peak = max(peak, int(h.max()) if len(h) else 1)
    step = (width - 60) / (len(edges) - 1)
    for s, h in hists.items():
        pts = " ".join(
            f"{50 + (i + 0.5) * step:.1f},{height - 30 - v / peak * (height - 50):.1f}"
            for i, v in enumerate(h.tolist())
        )
        lines.append(f'<polyline fill="none" stroke="{SPLIT_COLOURS[s]}" stroke-width="2" points="{pts}"/>')
    ticks = "".join(
        f'<text x="{50 + math.log10(v / lo) / math.log10(hi / lo) * (width - 60):.1f}" y="{height - 12}" '
        f'font-size="10" text-anchor="middle">{v:g} m</text>'
        for v in (1, 10, 100, 1000, 10000, 100000)
        if lo <= v <= hi
    )
    return (
        f"<h2>KNN distances (great-circle metres, log scale)</h2><svg width='{width}' height='{height}' "
        f"role='img' aria-label='KNN distance distribution'>"
        f"<line x1='50' y1='{height - 30}' x2='{width - 10}' "
        f"y2='{height - 30}' stroke='#333'/>{''.join(lines)}{ticks}</svg>"
    )


def bars(title: str, rows: list[tuple[str, int, str]], total: int | None = None, width: int = 640) -> str:
    """Horizontal bars: (label, value, colour)."""
    if not rows:
        return f"<h2>{_esc(title)}</h2><p>none</p>"
    peak = max(total or 0, max(v for _, v, _ in rows), 1)
    h = 18
    out = []
    for i, (label, value, colour) in enumerate(rows):
        w = value / peak * (width - 260)
        out.append(
            f'<text x="0" y="{i * h + 13}" font-size="12">{_esc(label)}</text>'
            f'<rect x="200" y="{i * h + 3}" width="{w:.1f}" height="{h - 6}" fill="{colour}"/>'
            f'<text x="{205 + w:.1f}" y="{i * h + 13}" font-size="12">{value}</text>'
        )
    svg = f"<svg width='{width}' height='{len(rows) * h + 4}' role='img'>{''.join(out)}</svg>"
    return f"<h2>{_esc(title)}</h2>{svg}"


def render(cfg: DataConfig, report: dict[str, Any]) -> str:
    layout = Layout(cfg)
    art = _artifact(layout)
    targets = art or _targets_from_plan(layout)
    parts = [
        f"<h1>{_esc(layout.output.name)}</h1><p>{'complete' if report['complete'] else 'not complete'}; "
        f"next run: {_esc(report['next_run'])}</p>"
    ]
    parts.append(
        map_panels(targets) if targets is not None else "<h2>Targets by split</h2><p>no plan yet</p>"
    )
    if art is not None:
        parts.append(knn_histogram(art))
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
    )
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_esc(layout.output.name)}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write(cfg: DataConfig, report: dict[str, Any], path: str | Path) -> None:
    durable.write_bytes(path, render(cfg, report).encode())
