"""The cost model's reports: the text summary, and the tables of docs/costs.md (generated, never typed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from building_image_triplet_model.costs.model import L4_RATE, Estimate, Inputs, estimate
from building_image_triplet_model.costs.prices import PRICES, PRICES_READ_ON


def _money(x: float) -> str:
    return f"${x:,.2f}"


def _rate(inp: Inputs) -> str:
    """The rate with where it comes from: the L4's default (measured or estimated) or given."""
    if inp.images_per_s == L4_RATE.images_per_s:
        return f"{inp.images_per_s:g} img/s ({L4_RATE.kind})"
    return f"{inp.images_per_s:g} img/s (given)"


def render_text(est: Estimate) -> str:
    inp = est.inputs
    mode = "Spot" if inp.spot else "on-demand"
    default = inp.images_per_s == L4_RATE.images_per_s
    out = [
        f"{inp.images:,.0f} images at {_rate(inp)} on {inp.workers} x {inp.machine} ({mode})",
        f"  rate: {L4_RATE.label if default else 'given on the command line'}",
        f"  embedding per worker      {est.embed_h:8.1f} h",
        f"  VM hours per worker       {est.vm_h_per_worker:8.1f} h (incl. preemption losses)",
        f"  expected preemptions      {est.preemptions:8.1f}",
        f"  wall time                 {est.wall_h:8.1f} h ({est.wall_h / 24:.1f} days)",
        "",
    ]
    for name, usd in est.lines.items():
        out.append(f"  {name:<32}{_money(usd):>12}")
    out.append(f"  {'total':<32}{_money(est.total):>12}")
    out.append("")
    verify = sorted(k for k, p in PRICES.items() if p.verify)
    out.append(f"Prices read on {PRICES_READ_ON}; to verify before relying on them: {', '.join(verify)}")
    return "\n".join(out)


def _compare_rows(base: Inputs, values: Sequence[float]) -> list[str]:
    rows = []
    for ips in values:
        spot = estimate(replace(base, images_per_s=ips, spot=True))
        od = estimate(replace(base, images_per_s=ips, spot=False))
        rows.append(
            f"| {ips:g} | {spot.embed_h:.1f} | {spot.wall_h / 24:.1f} | {spot.preemptions:.1f} | "
            f"{_money(spot.total)} | {od.wall_h / 24:.1f} | {_money(od.total)} |"
        )
    return rows


def render_markdown(
    base: Inputs | None = None, throughputs: Sequence[float] = (100, 150, 200, 250, 300)
) -> str:
    """The tables of docs/costs.md (a test checks that the document shows exactly this)."""
    base = base or Inputs()
    out = ["### The real dataset at the expected L4 throughput (eager 120-150 img/s, compiled ~200)", ""]
    out.append("| images | img/s | Spot: wall days | Spot: total | on-demand: wall days | on-demand: total |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    for images in (10e6, 20e6, 25e6):
        for ips in (120.0, 150.0, 200.0):
            spot = estimate(replace(base, images=images, images_per_s=ips, spot=True))
            od = estimate(replace(base, images=images, images_per_s=ips, spot=False))
            out.append(
                f"| {images / 1e6:g} M | {ips:g} | {spot.wall_h / 24:.1f} | {_money(spot.total)} | "
                f"{od.wall_h / 24:.1f} | {_money(od.total)} |"
            )
    out += [
        "",
        f"### Line items: {base.images / 1e6:g} M images at {base.images_per_s:g} img/s, Spot",
        "",
        f"The rate: {_rate(base)}; {L4_RATE.detail if base.images_per_s == L4_RATE.images_per_s else ''}.",
        "",
    ]
    est = estimate(base)
    od = estimate(replace(base, spot=False))
    out.append("| item | Spot | on-demand |")
    out.append("| --- | --- | --- |")
    for name in est.lines:
        out.append(f"| {name} | {_money(est.lines[name])} | {_money(od.lines[name])} |")
    out.append(f"| **total** | **{_money(est.total)}** | **{_money(od.total)}** |")
    out += [
        "",
        f"### How it changes with throughput ({base.images / 1e6:g} M images, one VM)",
        "",
        "| img/s | embedding h | Spot: wall days | Spot: preemptions | Spot: total | on-demand: wall days | "
        "on-demand: total |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *_compare_rows(base, throughputs),
        "",
        f"### One VM or Cloud Batch ({base.images / 1e6:g} M images, {base.images_per_s:g} img/s, Spot)",
        "",
        "| workers | wall days | GPU VM hours | total | vs one VM |",
        "| --- | --- | --- | --- | --- |",
    ]
    one = estimate(base).total
    for n in (1, 4, 8, 16):
        e = estimate(replace(base, workers=n))
        out.append(
            f"| {n} | {e.wall_h / 24:.2f} | {e.vm_h_per_worker * n:.0f} | {_money(e.total)} | "
            f"{(e.total - one) / one * 100:+.0f}% |"
        )
    out += ["", f"### Prices (USD, us-central1, read on {PRICES_READ_ON})", ""]
    out += ["| key | price | unit | source |", "| --- | --- | --- | --- |"]
    for key, p in PRICES.items():
        flag = " **verify**" if p.verify else ""
        out.append(f"| `{key}` | {p.usd:g}{flag} | {p.unit} | {p.source} |")
    return "\n".join(out)


DOC_BEGIN = "<!-- costs:begin -->"
DOC_END = "<!-- costs:end -->"


def update_doc(path: str, inp: Inputs | None = None) -> bool:
    """Rewrites the block between DOC_BEGIN and DOC_END; returns True when the file changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, sep, rest = text.partition(DOC_BEGIN + "\n")
    _, sep2, tail = rest.partition("\n" + DOC_END)
    if not sep or not sep2:
        raise ValueError(f"{path}: no {DOC_BEGIN} ... {DOC_END} block")
    new = head + sep + render_markdown(inp) + sep2 + tail
    if new == text:
        return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return True
