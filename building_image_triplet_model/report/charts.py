"""The page's charts, hand-written SVG (report_page.py says why): the targets on a map per dataset, the KNN
distances per split, horizontal bars."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
SPLITS = tuple(SPLIT_COLOURS)
MAX_POINTS_PER_PANEL = 1500
# A map's frame holds the targets between these percentiles of each axis (plus a margin): a few far-off
# targets (a wrong coordinate, a stray image) must not shrink a whole city to one dot. Those outside are
# counted in the caption, not drawn.
EXTENT_PERCENTILES = (1.0, 99.0)
M_PER_DEG = 111_320.0  # metres per degree of latitude (and of longitude at the equator)


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def nice_step(span: float, count: int = 4) -> float:
    """A round step (1, 2 or 5 times a power of ten) that cuts span into about count parts."""
    raw = max(span, 1e-12) / count
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _ticks(lo: float, hi: float) -> list[float]:
    step = nice_step(hi - lo)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def map_panel(d: int, lat: np.ndarray, lon: np.ndarray, split: np.ndarray, size: int = 240) -> str:
    """One dataset's targets: a robust frame, degree axes, a scale bar, and what lies outside counted."""
    left, top, right = 44, 6, 8  # the bottom's 30 px hold the longitude axis
    plot = size - left - right
    kx = math.cos(math.radians(float(np.median(lat))))  # equirectangular, true to scale at the centre
    (y0, y1), (x0, x1) = (np.percentile(v, EXTENT_PERCENTILES) for v in (lat, lon))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    half = max((x1 - x0) * kx, y1 - y0, 100 / M_PER_DEG) * 0.55  # degrees of latitude; at least 110 m across
    y0, y1, x0, x1 = cy - half, cy + half, cx - half / kx, cx + half / kx
    inside = (lat >= y0) & (lat <= y1) & (lon >= x0) & (lon <= x1)
    idx = np.flatnonzero(inside)
    idx = idx[:: max(1, -(-len(idx) // MAX_POINTS_PER_PANEL))]  # ceil: never more than the cap

    def px(lo_: float) -> float:
        return left + (lo_ - x0) / (x1 - x0) * plot

    def py(la: float) -> float:
        return top + (y1 - la) / (y1 - y0) * plot

    dots = "".join(
        f'<circle cx="{px(lo_):.1f}" cy="{py(la):.1f}" r="2" fill="{SPLIT_COLOURS[SPLITS[int(sp)]]}"/>'
        for la, lo_, sp in zip(lat[idx].tolist(), lon[idx].tolist(), split[idx].tolist(), strict=True)
    )
    axis = [f'<rect x="{left}" y="{top}" width="{plot}" height="{plot}" fill="#fafafa" stroke="#999"/>']
    for v in _ticks(x0, x1):
        axis.append(
            f'<line x1="{px(v):.1f}" y1="{top + plot}" x2="{px(v):.1f}" y2="{top + plot + 4}" stroke="#555"/>'
            f'<text x="{px(v):.1f}" y="{top + plot + 14}" font-size="9" text-anchor="middle">{v:g}</text>'
        )
    for v in _ticks(y0, y1):
        axis.append(
            f'<line x1="{left - 4}" y1="{py(v):.1f}" x2="{left}" y2="{py(v):.1f}" stroke="#555"/>'
            f'<text x="{left - 6}" y="{py(v) + 3:.1f}" font-size="9" text-anchor="end">{v:g}</text>'
        )
    axis.append(
        f'<text x="{left + plot / 2}" y="{size - 4}" font-size="10" text-anchor="middle">longitude (°)</text>'
        f'<text x="10" y="{top + plot / 2}" font-size="10" text-anchor="middle" '
        f'transform="rotate(-90 10 {top + plot / 2})">latitude (°)</text>'
    )
    across_m = 2 * half * M_PER_DEG
    bar_m = nice_step(across_m / 2, 1)  # a round length, at most half the frame
    bar_px = bar_m / across_m * plot
    label = f"{bar_m / 1000:g} km" if bar_m >= 1000 else f"{bar_m:g} m"
    bx, by = left + plot - 8 - bar_px, top + plot - 10
    axis.append(
        f'<g class="scale-bar"><rect x="{bx - 4:.1f}" y="{by - 14}" width="{bar_px + 8:.1f}" height="20" '
        f'fill="#fff" fill-opacity="0.8"/><line x1="{bx:.1f}" y1="{by}" x2="{bx + bar_px:.1f}" y2="{by}" '
        f'stroke="#000" stroke-width="2"/><text x="{bx + bar_px / 2:.1f}" y="{by - 4}" font-size="9" '
        f'text-anchor="middle">{label}</text></g>'
    )
    outside = int((~inside).sum())
    note = f", {outside} far off (outside the frame, not drawn)" if outside else ""
    return (
        f'<figure class="map"><svg width="{size}" height="{size}" viewBox="0 0 {size} {size}" role="img" '
        f'aria-label="targets of dataset {d}">{"".join(axis)}{dots}</svg>'
        f"<figcaption>dataset {d}: {len(lat)} targets{note}</figcaption></figure>"
    )


def map_panels(t: dict[str, np.ndarray]) -> str:
    """One map per dataset (the key's DatasetID part): each archive is one region of one city."""
    dataset = t["key"] // 1_000_000_000
    panels = [
        map_panel(int(d), t["lat"][sel], t["lon"][sel], t["split"][sel])
        for d in np.unique(dataset)
        for sel in [np.flatnonzero(dataset == d)]
    ]
    legend = " ".join(f'<span style="color:{c}">&#9679; {s}</span>' for s, c in SPLIT_COLOURS.items())
    return f"<h2>Targets by split</h2><p>{legend}</p><div class='maps'>{''.join(panels)}</div>"


def knn_histogram(a: dict[str, np.ndarray], width: int = 640, height: int = 260) -> str:
    """The share of each split's neighbours per distance bin (log scale), with axes and a legend."""
    title = "<h2>KNN distances (great-circle metres, log scale)</h2>"
    values = [a[f"knn_{s}"] for s in SPLITS if len(a[f"knn_{s}"])]
    if not values:
        return f"{title}<p>no neighbours (splits of one target)</p>"
    allv = np.concatenate(values)
    lo, hi = max(float(allv[allv > 0].min()) if (allv > 0).any() else 0.1, 0.1), max(float(allv.max()), 1.0)
    edges = np.logspace(math.log10(lo), math.log10(hi) + 1e-9, 41)
    left, right, top, bottom = 50, 10, 20, 40
    pw, ph = width - left - right, height - top - bottom
    shares = {}
    for s in SPLITS:
        h, _ = np.histogram(np.clip(a[f"knn_{s}"], lo, hi), bins=edges)
        shares[s] = h / max(1, len(a[f"knn_{s}"])) * 100
    peak = max(5.0, max(float(h.max()) for h in shares.values()))
    peak = math.ceil(peak / nice_step(peak)) * nice_step(peak)
    step = pw / (len(edges) - 1)
    out = [f"<line x1='{left}' y1='{top + ph}' x2='{left + pw}' y2='{top + ph}' stroke='#333'/>"]
    out.append(f"<line x1='{left}' y1='{top}' x2='{left}' y2='{top + ph}' stroke='#333'/>")
    for s, h in shares.items():
        if not len(a[f"knn_{s}"]):
            continue
        pts = " ".join(
            f"{left + (i + 0.5) * step:.1f},{top + ph - v / peak * ph:.1f}" for i, v in enumerate(h.tolist())
        )
        out.append(f'<polyline fill="none" stroke="{SPLIT_COLOURS[s]}" stroke-width="2" points="{pts}"/>')
    for v in (1, 10, 100, 1000, 10_000, 100_000, 1_000_000):
        if lo <= v <= hi:
            x = left + math.log10(v / lo) / math.log10(hi / lo) * pw
            out.append(
                f"<line x1='{x:.1f}' y1='{top + ph}' x2='{x:.1f}' y2='{top + ph + 4}' stroke='#333'/>"
                f"<text x='{x:.1f}' y='{top + ph + 16}' font-size='10' text-anchor='middle'>{v:g} m</text>"
            )
    for v in _ticks(0, peak):
        y = top + ph - v / peak * ph
        out.append(
            f"<line x1='{left - 4}' y1='{y:.1f}' x2='{left}' y2='{y:.1f}' stroke='#333'/>"
            f"<text x='{left - 6}' y='{y + 3:.1f}' font-size='10' text-anchor='end'>{v:g}</text>"
        )
    out.append(
        f"<text x='{left + pw / 2}' y='{height - 4}' font-size='11' text-anchor='middle'>"
        "distance from a target to one of its neighbours (m, log scale)</text>"
        f"<text x='12' y='{top + ph / 2}' font-size='11' text-anchor='middle' "
        f"transform='rotate(-90 12 {top + ph / 2})'>% of the split's neighbours</text>"
    )
    for i, s in enumerate(SPLITS):  # the legend
        y = top + 6 + i * 14
        out.append(
            f"<g class='legend'><line x1='{left + pw - 150}' y1='{y}' x2='{left + pw - 130}' y2='{y}' "
            f"stroke='{SPLIT_COLOURS[s]}' stroke-width='2'/><text x='{left + pw - 125}' y='{y + 4}' "
            f"font-size='10'>{s} ({int(a.get(f'n_{s}', len(a[f'knn_{s}'])))} distances)</text></g>"
        )
    return (
        f"{title}<svg width='{width}' height='{height}' role='img' aria-label='KNN distance distribution'>"
        f"{''.join(out)}</svg>"
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
