"""report_page.py: one self-contained HTML page with inline SVG, read back with html.parser."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest

from building_image_triplet_model import config
from building_image_triplet_model.io.workdir import Layout
from building_image_triplet_model.report import charts, report_page, status


@dataclass
class Svg:
    section: str
    elements: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag]


class Page(HTMLParser):
    """The page's sections (h2), its SVGs with their elements, the map figures and every tag seen."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[str] = Counter()
        self.attr_values: list[str] = []
        self.sections: list[str] = []
        self.svgs: list[Svg] = []
        self.captions: list[str] = []
        self.map_figures = 0
        self._in: list[str] = []
        self._svg: Svg | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags[tag] += 1
        self.attr_values += list(a.values())
        if tag == "svg":
            self._svg = Svg(self.sections[-1] if self.sections else "")
            self.svgs.append(self._svg)
        elif self._svg is not None:
            self._svg.elements.append((tag, a))
        if tag == "figure" and a.get("class") == "map":
            self.map_figures += 1
        self._in.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data: str) -> None:
        where = self._in[-1] if self._in else ""
        if where == "h2":
            self.sections.append(data)
        elif where == "figcaption":
            self.captions.append(data)
        elif where == "text" and self._svg is not None:
            self._svg.texts.append(data)

    def svgs_in(self, section_start: str) -> list[Svg]:
        return [s for s in self.svgs if s.section.startswith(section_start)]


def assert_self_contained(text: str, page: Page) -> None:
    assert page.tags["script"] == 0 and page.tags["link"] == 0 and page.tags["img"] == 0
    assert page.tags["iframe"] == 0 and page.tags["object"] == 0
    lower = text.lower()
    assert "http://" not in lower and "https://" not in lower and "//" not in "".join(page.attr_values)
    assert "<script" not in lower and "url(" not in lower


def artifact_targets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[f"targets/{k}"][()] for k in ("key", "lat", "lon", "split")}


@pytest.fixture(scope="module")
def complete_page(reference: config.DataConfig) -> tuple[str, Page, dict]:
    report = status.collect(reference)
    text = report_page.render(reference, report)
    return text, Page(text), report


def test_one_map_panel_per_dataset_with_a_circle_per_target_coloured_by_split(
    reference: config.DataConfig, complete_page: tuple[str, Page, dict]
) -> None:
    _, page, _ = complete_page
    t = artifact_targets(Layout(reference).output)
    datasets = np.unique(t["key"] // 1_000_000_000)
    assert datasets.tolist() == [3, 4, 9]
    maps = page.svgs_in("Targets by split")
    assert page.map_figures == len(maps) == 3
    for d, svg in zip(datasets.tolist(), maps, strict=True):
        sel = t["key"] // 1_000_000_000 == d
        circles = svg.all("circle")
        assert len(circles) == int(sel.sum()) == 13
        want = Counter(charts.SPLIT_COLOURS[charts.SPLITS[s]] for s in t["split"][sel].tolist())
        assert Counter(c["fill"] for c in circles) == want
        [frame] = [r for r in svg.all("rect") if r.get("stroke")]
        x0, y0 = float(frame["x"]), float(frame["y"])
        x1, y1 = x0 + float(frame["width"]), y0 + float(frame["height"])
        for c in circles:  # inside the frame
            assert x0 <= float(c["cx"]) <= x1 and y0 <= float(c["cy"]) <= y1
        assert "longitude (°)" in svg.texts and "latitude (°)" in svg.texts  # axes
        assert sum(t.replace(".", "").lstrip("-").isdigit() for t in svg.texts) >= 4  # tick labels
        assert any(t.endswith((" m", " km")) for t in svg.texts)  # the scale bar
    assert [c.split(":")[0] for c in page.captions] == ["dataset 3", "dataset 4", "dataset 9"]
    assert all(c.endswith(": 13 targets") for c in page.captions)


def test_far_off_targets_do_not_shrink_the_map_they_are_counted() -> None:
    rng = np.random.default_rng(2)
    n = 200
    lat = np.concatenate([rng.uniform(40.70, 40.72, n), [10.0, -30.0]])  # two wrong coordinates
    lon = np.concatenate([rng.uniform(-74.01, -73.99, n), [20.0, 100.0]])
    t = {"key": 3_000_000_000 + np.arange(n + 2), "lat": lat, "lon": lon, "split": np.zeros(n + 2, np.int8)}
    page = Page(charts.map_panels(t))
    [svg] = page.svgs
    circles = svg.all("circle")
    xs = [float(c["cx"]) for c in circles]
    assert max(xs) - min(xs) > 100  # spread over the frame, not collapsed into one dot
    assert len(circles) + 2 == n + 2  # every target of the city drawn: the margin keeps the frame's edges
    assert page.captions == ["dataset 3: 202 targets, 2 far off (outside the frame, not drawn)"]
    [bar] = [t for t in svg.texts if t.endswith((" m", " km"))]
    assert bar in ("500 m", "1 km", "2 km")  # a city's few kilometres, not thousands


def test_the_knn_histogram_has_a_line_per_split_axes_and_a_legend(
    complete_page: tuple[str, Page, dict],
) -> None:
    _, page, _ = complete_page
    [hist] = page.svgs_in("KNN distances")
    lines = hist.all("polyline")
    assert [p["stroke"] for p in lines] == list(charts.SPLIT_COLOURS.values())
    for p in lines:
        points = [tuple(map(float, xy.split(","))) for xy in p["points"].split()]
        assert len(points) == 40  # bins
        assert all(50 <= x <= 640 and 20 <= y <= 220 for x, y in points)
    # Some distances are drawn: not every line lies on the base line.
    assert any(float(xy.split(",")[1]) < 220 for p in lines for xy in p["points"].split())
    assert any(t.endswith(" m") for t in hist.texts)  # distance ticks
    assert "distance from a target to one of its neighbours (m, log scale)" in hist.texts
    assert "% of the split's neighbours" in hist.texts
    legend = [t for t in hist.texts if t.endswith(" distances)")]
    assert [t.split(" ")[0] for t in legend] == ["train", "val", "test"]


def test_a_bar_per_reject_reason_with_who_found_it(complete_page: tuple[str, Page, dict]) -> None:
    _, page, report = complete_page
    [svg] = page.svgs_in("Rejects by reason")
    by = report["rejects_found_by"]
    want = [f"{reason} ({who})" for who in ("index", "decoder") for reason in sorted(by[who])]
    labels = svg.texts[0::2]
    values = svg.texts[1::2]
    assert labels == want
    assert values == [str(by[who][r]) for who in ("index", "decoder") for r in sorted(by[who])]
    rects = svg.all("rect")
    assert len(rects) == len(want) == 14
    colours = [r["fill"] for r in rects]
    assert colours[:11] == ["#8c564b"] * 11 and colours[11:] == ["#9467bd"] * 3
    widths = {label: float(r["width"]) for label, r in zip(labels, rects, strict=True)}
    assert widths["duplicate_stem (index)"] == max(widths.values())  # 12 is the largest count


def test_a_bar_per_archive(complete_page: tuple[str, Page, dict]) -> None:
    _, page, report = complete_page
    [svg] = page.svgs_in("Embeddings per archive")
    assert svg.texts[0::2] == ["0003: reusable", "0004: reusable", "0009: reusable"]
    assert svg.texts[1::2] == [str(report["archives"][n]["images"]) for n in ("0003", "0004", "0009")]
    assert {r["fill"] for r in svg.all("rect")} == {report_page.STATE_COLOURS["reusable"]}


def test_the_page_is_self_contained(complete_page: tuple[str, Page, dict]) -> None:
    text, page, _ = complete_page
    assert text.startswith("<!DOCTYPE html>\n<html lang='en'>")
    assert_self_contained(text, page)
    assert page.sections == [
        "Totals",
        "Targets by split",
        "KNN distances (great-circle metres, log scale)",
        "Rejects by reason (who found them)",
        "Embeddings per archive (images embedded of those needed)",
    ]


def test_write_puts_the_page_in_a_file(reference: config.DataConfig, tmp_path: Path) -> None:
    report = status.collect(reference)
    path = tmp_path / "sub" / "page.html"
    assert report_page.write(reference, report, path, when="T") == path
    assert path.read_text() == report_page.render(reference, report, when="T")


def test_the_header_and_the_totals(complete_page: tuple[str, Page, dict], reference) -> None:
    text, page, report = complete_page
    assert "<dt>config</dt>" in text and f"<dd>{Layout(reference).output}</dd>" in text
    assert "<dt>report made</dt>" in text
    t = artifact_targets(Layout(reference).output)
    for i, split in enumerate(charts.SPLITS):
        assert report["splits"][split]["targets"] == int((t["split"] == i).sum())
    total = sum(v["images"] for v in report["splits"].values())
    assert f"<td>total</td><td>39</td><td>{total}</td><td>{sum(report['rejects'].values())}</td>" in text
    for name, a in report["archives"].items():
        assert f"<td>{name}</td><td>{a['indexed']}</td><td>13</td><td>{a['rejected']}</td>" in text
    assert "Progress" not in page.sections  # complete: nothing in progress


# ------------------------------------------------------------------------------------ not complete yet
def test_before_the_artifact_maps_and_knn_come_from_the_work_folder(
    reference: config.DataConfig, tmp_path: Path
) -> None:
    lay = Layout(reference)
    out = tmp_path / "out"
    shutil.copytree(lay.work, out / "dataset.work")  # the work folder only: no artifact, no stats
    cfg = config.from_mapping({**_settings(reference), "hdf5_path": str(out / "dataset.h5")})
    report = status.collect(cfg)
    assert report["complete"] is False and report["steps"]["knn"]["status"] == "done"
    text = report_page.render(cfg, report)
    page = Page(text)
    assert_self_contained(text, page)
    # KNN is done: its distances are shown, from the KNN chunks
    [hist] = page.svgs_in("KNN distances")
    assert len(hist.all("polyline")) == 3
    maps = page.svgs_in("Targets by split")
    assert len(maps) == 3 and sum(len(m.all("circle")) for m in maps) == 39
    assert "<dd>not complete</dd>" in text
    assert page.sections[:2] == ["Progress", "Totals"]
    assert "<td>knn</td><td>done</td><td>39 / 39 targets</td>" in text


def test_without_a_plan_there_is_no_map(reference: config.DataConfig, tmp_path: Path) -> None:
    cfg = config.from_mapping({**_settings(reference), "hdf5_path": str(tmp_path / "o" / "d.h5")})
    report = status.collect(cfg)
    text = report_page.render(cfg, report)
    page = Page(text)
    assert page.map_figures == 0 and "no plan yet" in text
    [svg] = page.svgs_in("Embeddings per archive")
    assert svg.texts[0::2] == ["0003: not indexed", "0004: not indexed", "0009: not indexed"]
    assert page.svgs_in("Rejects by reason") == []  # no rejects known yet: 'none'
    assert "<h2>Rejects by reason (who found them)</h2><p>none</p>" in text
    assert not (tmp_path / "o").exists()


def _settings(cfg: config.DataConfig) -> dict:
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if k in config.known_keys()}


def test_a_panel_shows_at_most_the_cap() -> None:
    n = 800
    rng = np.random.default_rng(0)
    t = {
        "key": np.concatenate([3_000_000_000 + np.arange(n), 4_000_000_000 + np.arange(5)]),
        "lat": np.concatenate([rng.uniform(40, 41, n), [10.0] * 5]),
        "lon": np.concatenate([rng.uniform(-74, -73, n), [20.0] * 5]),
        "split": np.concatenate([rng.integers(0, 3, n), [0] * 5]).astype(np.int8),
    }
    page = Page(charts.map_panels(t))
    assert [len(s.all("circle")) for s in page.svgs] == [800, 5]  # under the cap: every target


def test_a_large_panel_is_thinned_to_the_cap() -> None:
    n = 2000
    rng = np.random.default_rng(1)
    t = {
        "key": 3_000_000_000 + np.arange(n),
        "lat": rng.uniform(40, 41, n),
        "lon": rng.uniform(-74, -73, n),
        "split": rng.integers(0, 3, n).astype(np.int8),
    }
    page = Page(charts.map_panels(t))
    assert len(page.svgs[0].all("circle")) <= charts.MAX_POINTS_PER_PANEL


# ------------------------------------------------------------------------------------- in a real browser
def _browser(page: Path, shot: Path) -> str:
    """Headless Chromium (Debian's `chromium`, make sys-deps): a screenshot, and the DOM it rendered."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: run make sys-deps"
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000"]
    url = page.resolve().as_uri()
    subprocess.run([*common, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=120)
    dom = subprocess.run(
        [*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120
    )
    return dom.stdout


def _assert_drawn(shot: Path) -> None:
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 2000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50  # text, dots and lines were painted, not a blank page


def test_the_page_in_a_browser_complete_and_partial(reference: config.DataConfig, tmp_path: Path) -> None:
    lay = Layout(reference)
    shutil.copytree(lay.work, tmp_path / "out" / "dataset.work")  # a run stopped after KNN
    partial = config.from_mapping({**_settings(reference), "hdf5_path": str(tmp_path / "out" / "dataset.h5")})
    for name, cfg, complete in (("complete", reference, True), ("partial", partial, False)):
        report = status.collect(cfg)
        assert report["complete"] is complete
        page = report_page.write(cfg, report, tmp_path / f"{name}.html", cfg_path="cfg.yaml")
        dom = _browser(page, tmp_path / f"{name}.png")
        _assert_drawn(tmp_path / f"{name}.png")
        shown = Page(dom)
        want = ["Totals", "Targets by split", "KNN distances (great-circle metres, log scale)"]
        assert all(s in shown.sections for s in want), shown.sections
        assert ("Progress" in shown.sections) is not complete
        total = sum(v["images"] for v in report["splits"].values())
        assert f"<td>total</td><td>39</td><td>{total}</td>" in dom
        assert "<dt>config</dt><dd>cfg.yaml</dd>" in dom
        assert len(shown.svgs_in("Targets by split")) == 3
