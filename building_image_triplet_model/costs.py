"""What a preprocessing run costs on Google Cloud: a small, dependency-free model.

Every price the model uses, with its source and the date it was read, is in :data:`PRICES` (``prices.py``,
re-exported here); ``docs/costs.md`` explains the model and prints its tables from this module.

The model, for ``workers`` VMs (1 = the single VM or managed group; N = Google Cloud Batch):

* **GPU VM hours.** Each worker boots and installs (``setup_h``), downloads and indexes its share of the
  archives, embeds its share of the images at ``images_per_s`` (the GPU is the bottleneck), and loses, per
  preemption, half a checkpoint interval of work plus the restart time (plus the setup again for a Batch
  retry, which gets a fresh VM). With ``p`` preemptions per day of VM
  time and ``loss_h`` hours lost each, VM hours ``T`` solve ``T = base + p * T / 24 * loss_h``.
* **Merge.** KNN, assembly and upload (``tail_h``): on the GPU VM itself for a single VM; on one CPU VM
  (``merge_machine``) for Batch.
* **Disks** for the run's wall time plus ``disk_keep_days``; the boot disk while the VM exists.
* **Buckets**: the raw archive mirror through its lifecycle (Standard, then Nearline, then Coldline, then
  deleted: gcp/lifecycle/raw-bucket.json), the artifact for ``artifact_keep_days`` and the checkpoints for
  ``checkpoint_keep_days`` (Standard).

Every input is defined once, as a field of :class:`Inputs` (default, help, option); the command line
(``python -m building_image_triplet_model.costs --help``) is generated from those fields.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import Field, asdict, dataclass, field, fields, replace
from typing import Any, TypeVar, get_args, get_type_hints

from .prices import PRICES, PRICES_READ_ON, Price

__all__ = [
    "PRICES",
    "PRICES_READ_ON",
    "Estimate",
    "Inputs",
    "Price",
    "estimate",
    "main",
    "render_markdown",
    "update_doc",
]

HOURS_PER_MONTH = 730.0  # Google Cloud prorates GB-month prices over 730 hours
DAYS_PER_MONTH = HOURS_PER_MONTH / 24.0

RAW_LIFECYCLE_DAYS = (30, 90, 365)  # Standard until 30 days, Nearline until 90, Coldline until deleted at 365

_T = TypeVar("_T")


def _input(default: _T, help: str | None = None, **cli: Any) -> _T:
    """An :class:`Inputs` field: its default, its help (meaning and unit, shown by --help) and how the command
    line sets it (read by :func:`_options`): by default one option ``--field-name`` of the field's type;
    ``flag`` renames it, ``choices`` restricts it; ``switches``: a bool's options, (flag, value it sets, help)
    each; ``parts``: a tuple's options, one per element; ``cli=False``: no option."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class Inputs:
    images: float = _input(20e6, "image/metadata pairs to embed (%(default)g)")
    images_per_s: float = _input(200.0, "embedding throughput of one L4 (%(default)g)")
    spot: bool = _input(
        True,
        "Spot (True) or on-demand VMs",
        switches=(
            ("--spot", True, "Spot VMs (default)"),
            ("--on-demand", False, "on-demand VMs (no preemptions)"),
        ),
    )
    preemptions_per_day: float = _input(
        1.0, "Spot preemptions per day of VM time (%(default)g)", flag="--preemption-rate-per-day"
    )
    checkpoint_interval_min: float = _input(30.0, "work lost per preemption is half of this (%(default)g)")
    restart_min: float = _input(
        20.0, "VM time to come back after a preemption: boot, driver check, resume (%(default)g)"
    )
    capacity_wait_h: float = _input(0.5, "wall time without a VM after each preemption (%(default)g)")
    setup_h: float = _input(0.5, "first boot: driver, uv sync (%(default)g)")
    archives_gb: float = _input(448.0, "(%(default)g)")
    download_mb_s: float = _input(100.0, "per VM (%(default)g)")
    read_mb_s: float = _input(200.0, "tar indexing read rate (%(default)g)")
    tail_h: float = _input(2.0, "KNN, assembly, upload (%(default)g)")
    workers: int = _input(1, "1: one VM; N: Cloud Batch tasks (%(default)d)")
    machine: str = _input("g2-standard-16", "machine type of the GPU VMs", cli=False)
    merge_machine: str = _input("n2-highmem-8", "machine type of the Batch merge VM (on demand)", cli=False)
    raw_disk_gb: float = _input(1024.0, "raw-archive data disk of the single VM, GB", cli=False)
    work_disk_gb: float = _input(512.0, "work data disk of the single VM and of the merge VM, GB", cli=False)
    worker_raw_disk_gb: float = _input(200.0, "raw-archive disk of each Batch worker, GB", cli=False)
    worker_work_disk_gb: float = _input(200.0, "work disk of each Batch worker, GB", cli=False)
    boot_disk_gb: float = _input(50.0, "boot disk of every VM, GB (always pd-balanced)", cli=False)
    # --disk-type, the --raw-*-days and --embedding-bytes never showed a default in --help; they still don't.
    disk_type: str = _input("pd-balanced", choices=("pd-balanced", "pd-standard", "pd-ssd"))
    disk_keep_days: float = _input(2.0, "days the data disks are kept after the run (%(default)g)")
    mirror_raw: bool = _input(
        True,
        "the archives are mirrored to the raw bucket",
        switches=(("--no-raw-mirror", False, "the archives are not mirrored to the raw bucket"),),
    )
    raw_lifecycle_days: tuple[int, int, int] = _input(
        RAW_LIFECYCLE_DAYS, parts=("--raw-nearline-days", "--raw-coldline-days", "--raw-delete-days")
    )
    embedding_dim: int = _input(768, "values per embedding", cli=False)
    # --help has always listed --embedding-bytes last, while JSON lists the inputs in field order: keep both.
    embedding_bytes: int = _input(2, "2: float16, 4: float32", help_last=True)
    artifact_keep_days: float = _input(365.0, "(%(default)g)")
    checkpoint_keep_days: float = _input(30.0, "(%(default)g)")

    def __post_init__(self) -> None:
        if self.images <= 0 or self.images_per_s <= 0:
            raise ValueError("images and images_per_s must be positive")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.preemptions_per_day < 0:
            raise ValueError("preemptions_per_day must not be negative")
        lost = self.preemptions_per_day * self.loss_per_preemption_h / 24.0
        if self.spot and lost >= 1.0:
            raise ValueError("preemptions_per_day is so high that the run never finishes")
        a, b, c = self.raw_lifecycle_days
        if not 0 <= a <= b <= c:
            raise ValueError("raw_lifecycle_days must be non-decreasing (nearline, coldline, delete)")
        for key in (
            f"vm.{self.machine}.on_demand",
            f"vm.{self.merge_machine}.on_demand",
            f"disk.{self.disk_type}",
        ):
            if key not in PRICES:
                raise ValueError(f"no price for {key!r}: add it to PRICES")

    @property
    def loss_per_preemption_h(self) -> float:
        """VM time lost per preemption: half a checkpoint interval of work plus the restart. A Batch retry
        runs on a fresh VM with fresh disks, so it also repeats the setup (driver, uv sync)."""
        loss = self.checkpoint_interval_min / 2.0 / 60.0 + self.restart_min / 60.0
        return loss + (self.setup_h if self.workers > 1 else 0.0)


@dataclass
class Estimate:
    inputs: Inputs
    embed_h: float
    base_vm_h: float
    vm_h_per_worker: float
    preemptions: float
    merge_h: float
    wall_h: float
    lines: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.lines.values())

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["total"] = self.total
        return d


def _price(key: str) -> float:
    return PRICES[key].usd


def _gcs_raw_mirror(gb: float, days: tuple[int, int, int]) -> float:
    standard, nearline, delete = days
    return (
        gb * _price("gcs.standard") * standard
        + gb * _price("gcs.nearline") * (nearline - standard)
        + gb * _price("gcs.coldline") * (delete - nearline)
    ) / DAYS_PER_MONTH


def estimate(inp: Inputs) -> Estimate:
    """The cost of one run, line by line (USD)."""
    n = inp.workers
    embed_h = inp.images / inp.images_per_s / 3600.0 / n
    download_h = inp.archives_gb * 1000.0 / inp.download_mb_s / 3600.0 / n
    index_h = inp.archives_gb * 1000.0 / inp.read_mb_s / 3600.0 / n
    base = inp.setup_h + download_h + index_h + embed_h
    single = n == 1
    if single:
        base += inp.tail_h  # KNN, assembly and upload run on the GPU VM itself
    rate = inp.preemptions_per_day if inp.spot else 0.0
    vm_h = base / (1.0 - rate * inp.loss_per_preemption_h / 24.0)
    preemptions = rate * vm_h / 24.0
    merge_h = 0.0 if single else inp.tail_h + inp.setup_h
    wall_h = vm_h + preemptions * inp.capacity_wait_h + merge_h

    model = "spot" if inp.spot else "on_demand"
    lines: dict[str, float] = {}
    lines["GPU VMs"] = n * vm_h * _price(f"vm.{inp.machine}.{model}")
    ip = _price(f"ip.external_ipv4.{'spot' if inp.spot else 'standard'}")
    lines["external IPv4"] = n * vm_h * ip
    if not single:
        lines["merge VM (CPU)"] = merge_h * (
            _price(f"vm.{inp.merge_machine}.on_demand") + _price("ip.external_ipv4.standard")
        )
    disk = _price(f"disk.{inp.disk_type}")
    boot = _price("disk.pd-balanced")
    if single:
        data_gb_h = (inp.raw_disk_gb + inp.work_disk_gb) * (wall_h + inp.disk_keep_days * 24.0)
        boot_gb_h = inp.boot_disk_gb * wall_h
    else:  # Batch disks live and die with each task's VM; the merge VM has a work disk of its own
        data_gb_h = n * (inp.worker_raw_disk_gb + inp.worker_work_disk_gb) * vm_h + inp.work_disk_gb * merge_h
        boot_gb_h = inp.boot_disk_gb * (n * vm_h + merge_h)
    lines["persistent disks"] = data_gb_h * disk / HOURS_PER_MONTH + boot_gb_h * boot / HOURS_PER_MONTH
    if inp.mirror_raw:
        lines["raw archive mirror (lifecycle)"] = _gcs_raw_mirror(inp.archives_gb, inp.raw_lifecycle_days)
    artifact_gb = inp.images * inp.embedding_dim * inp.embedding_bytes / 1e9 * 1.05  # + metadata, splits, KNN
    gcs = _price("gcs.standard") / DAYS_PER_MONTH
    lines["artifact in bucket"] = artifact_gb * gcs * inp.artifact_keep_days
    lines["checkpoints in bucket"] = artifact_gb * gcs * inp.checkpoint_keep_days
    return Estimate(
        inputs=inp,
        embed_h=embed_h,
        base_vm_h=base,
        vm_h_per_worker=vm_h,
        preemptions=preemptions * n,
        merge_h=merge_h,
        wall_h=wall_h,
        lines=lines,
    )


# ------------------------------------------------------------------------------------------------------------
# Reports


def _money(x: float) -> str:
    return f"${x:,.2f}"


def render_text(est: Estimate) -> str:
    inp = est.inputs
    mode = "Spot" if inp.spot else "on-demand"
    out = [
        f"{inp.images:,.0f} images at {inp.images_per_s:g} img/s on {inp.workers} x {inp.machine} ({mode})",
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
    out = ["### The real dataset at the expected L4 throughput", ""]
    out.append("| images | img/s | Spot: wall days | Spot: total | on-demand: wall days | on-demand: total |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    for images in (10e6, 20e6, 25e6):
        for ips in (150.0, 250.0):
            spot = estimate(replace(base, images=images, images_per_s=ips, spot=True))
            od = estimate(replace(base, images=images, images_per_s=ips, spot=False))
            out.append(
                f"| {images / 1e6:g} M | {ips:g} | {spot.wall_h / 24:.1f} | {_money(spot.total)} | "
                f"{od.wall_h / 24:.1f} | {_money(od.total)} |"
            )
    out += ["", f"### Line items: {base.images / 1e6:g} M images at {base.images_per_s:g} img/s, Spot", ""]
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


# ------------------------------------------------------------------------------------------------------------
# Command line: generated from the fields of Inputs


def _options(f: Field[Any], hint: Any) -> list[tuple[str, dict[str, Any]]]:
    """The options that set Inputs field ``f`` (of type ``hint``) as (flag, add_argument keywords). Each dest
    is the one argparse would derive from the flag, so --help keeps its metavars; a bool's switches share one.
    """
    meta = f.metadata
    if not meta.get("cli", True):
        return []
    if "switches" in meta:
        action = {True: "store_true", False: "store_false"}
        return [
            (flag, {"dest": f.name, "action": action[value], "default": f.default, "help": text})
            for flag, value, text in meta["switches"]
        ]
    if "parts" in meta:
        return [
            (flag, {"dest": flag[2:].replace("-", "_"), "type": kind, "default": default})
            for flag, kind, default in zip(meta["parts"], get_args(hint), f.default, strict=True)
        ]
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    kwargs = {"type": hint, "default": f.default, "choices": meta.get("choices"), "help": meta["help"]}
    return [(flag, {"dest": flag[2:].replace("-", "_"), **kwargs})]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.costs",
        description="Estimate the Google Cloud cost of one preprocessing run (prices: costs.PRICES).",
    )
    hints = get_type_hints(Inputs)  # the annotations are strings (from __future__ import annotations)
    # JSON lists the inputs in field order, --help as it always has: --embedding-bytes last (a stable sort).
    for f in sorted(fields(Inputs), key=lambda f: f.metadata.get("help_last", False)):
        options = _options(f, hints[f.name])
        # --spot and --on-demand set the same bool: giving both is a mistake argparse should refuse.
        group = p.add_mutually_exclusive_group() if len(options) > 1 and "switches" in f.metadata else p
        for flag, kwargs in options:
            group.add_argument(flag, **kwargs)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the estimate as JSON")
    out.add_argument("--markdown", action="store_true", help="print the tables of docs/costs.md")
    out.add_argument("--prices", action="store_true", help="print every price with its source")
    out.add_argument(
        "--update-doc",
        metavar="FILE",
        help="replace the generated block of FILE (docs/costs.md) with the current tables",
    )
    return p


def _inputs_from(args: argparse.Namespace) -> Inputs:
    """The Inputs the parsed command line describes; a field without options keeps its default."""
    values: dict[str, Any] = {}
    hints = get_type_hints(Inputs)
    for f in fields(Inputs):
        given = tuple(getattr(args, kwargs["dest"]) for _, kwargs in _options(f, hints[f.name]))
        if given:  # a tuple has one option per element; the switches of a bool all set the same dest
            values[f.name] = given if "parts" in f.metadata else given[0]
    return Inputs(**values)


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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        inp = _inputs_from(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.update_doc:
        try:
            changed = update_doc(args.update_doc, inp)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{args.update_doc}: {'updated' if changed else 'up to date'}")
    elif args.markdown:
        print(render_markdown(inp))
    elif args.prices:
        for key, p in PRICES.items():
            print(f"{key:32} {p.usd:>10g}  {p.unit}{'  [verify]' if p.verify else ''}\n{'':32} {p.source}")
        print(f"read on {PRICES_READ_ON}")
    elif args.json:
        print(json.dumps(estimate(inp).to_dict(), indent=2, default=list))
    else:
        print(render_text(estimate(inp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
