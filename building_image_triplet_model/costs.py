"""What a preprocessing run costs on Google Cloud: a small, dependency-free model.

Every price the model uses, with the date it was read and where it came from, is in :data:`PRICES` (one place;
``docs/costs.md`` explains the model and prints its tables from this module). Prices marked ``verify`` are
list prices that could not be confirmed from a primary source when they were read: check them against the
Google Cloud pricing pages (or the Cloud Billing catalog) before relying on them.

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

Command line: ``python -m building_image_triplet_model.costs --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

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

PRICES_READ_ON = "2026-11-29"
HOURS_PER_MONTH = 730.0  # Google Cloud prorates GB-month prices over 730 hours
DAYS_PER_MONTH = HOURS_PER_MONTH / 24.0


@dataclass(frozen=True)
class Price:
    usd: float
    unit: str
    source: str
    verify: bool = False


# All prices: USD, us-central1 (Iowa), list prices without discounts or taxes, read on PRICES_READ_ON.
PRICES: dict[str, Price] = {
    "vm.g2-standard-16.on_demand": Price(
        1.14720837,
        "per VM hour (16 vCPU, 64 GB, 1 NVIDIA L4 included)",
        "cloud.google.com/compute/all-pricing: g2-standard-4 is $0.70683228/h; each g2 step of +4 vCPU "
        "and +16 GB adds $0.14679203/h (g2-standard-8 $0.85362431) -> 0.70683228 + 3 x 0.14679203",
        verify=True,
    ),
    "vm.g2-standard-16.spot": Price(
        0.4589,
        "per VM hour",
        "estimate: Spot G2 is about 60% below on demand (g2-standard-4 Spot reported at about $0.28/h, i.e. "
        "0.40 x $0.7068); Spot prices change up to once a day: cloud.google.com/spot-vms/pricing",
        verify=True,
    ),
    "vm.n2-highmem-8.on_demand": Price(
        0.524,
        "per VM hour (8 vCPU, 64 GB)",
        "list price as known (cloud.google.com/compute/vm-instance-pricing, N2 high-memory)",
        verify=True,
    ),
    "vm.n2-highmem-8.spot": Price(
        0.157,
        "per VM hour",
        "estimate: about 70% below on demand for N2 Spot",
        verify=True,
    ),
    "ip.external_ipv4.standard": Price(
        0.005,
        "per hour while attached",
        "cloud.google.com/vpc/network-pricing (in-use external IPv4, since 2024-02)",
        verify=True,
    ),
    "ip.external_ipv4.spot": Price(
        0.0025,
        "per hour while attached",
        "cloud.google.com/vpc/network-pricing (external IPv4 on Spot/preemptible VMs)",
        verify=True,
    ),
    "disk.pd-balanced": Price(
        0.100,
        "per GiB-month",
        "cloud.google.com/compute/disks-image-pricing (Balanced PD capacity, us-central1)",
    ),
    "disk.pd-standard": Price(
        0.040,
        "per GiB-month",
        "cloud.google.com/compute/disks-image-pricing (its example: 200 GB standard PD = $8.00/month)",
    ),
    "disk.pd-ssd": Price(
        0.170,
        "per GiB-month",
        "cloud.google.com/compute/disks-image-pricing (its example: 200 GB SSD PD = $34.00/month)",
    ),
    "snapshot.standard.regional": Price(
        0.05,
        "per GiB-month",
        "Compute Engine pricing announcement: regional standard snapshots $0.05/GB-month from 2023-04-01",
    ),
    "gcs.standard": Price(0.020, "per GiB-month", "cloud.google.com/storage/pricing (us-central1, regional)"),
    "gcs.nearline": Price(0.010, "per GiB-month", "cloud.google.com/storage/pricing (us-central1, regional)"),
    "gcs.coldline": Price(0.004, "per GiB-month", "cloud.google.com/storage/pricing (us-central1, regional)"),
    "gcs.archive": Price(0.0012, "per GiB-month", "cloud.google.com/storage/pricing (us-central1, regional)"),
    "gcs.retrieval.nearline": Price(
        0.01, "per GiB read", "cloud.google.com/storage/pricing (retrieval fees)", verify=True
    ),
    "gcs.retrieval.coldline": Price(
        0.02, "per GiB read", "cloud.google.com/storage/pricing (retrieval fees)", verify=True
    ),
    "logging.ingestion": Price(
        0.50,
        "per GiB beyond the first 50 GiB per project and month",
        "cloud.google.com/stackdriver/pricing",
        verify=True,
    ),
    "batch.service": Price(
        0.0,
        "per job",
        "cloud.google.com/batch/pricing: no charge for Batch itself, only the resources it uses",
    ),
}

RAW_LIFECYCLE_DAYS = (30, 90, 365)  # Standard until 30 days, Nearline until 90, Coldline until deleted at 365


@dataclass(frozen=True)
class Inputs:
    images: float = 20e6
    images_per_s: float = 200.0
    spot: bool = True
    preemptions_per_day: float = 1.0
    checkpoint_interval_min: float = 30.0
    restart_min: float = 20.0
    capacity_wait_h: float = 0.5
    setup_h: float = 0.5
    archives_gb: float = 448.0
    download_mb_s: float = 100.0
    read_mb_s: float = 200.0
    tail_h: float = 2.0
    workers: int = 1
    machine: str = "g2-standard-16"
    merge_machine: str = "n2-highmem-8"
    raw_disk_gb: float = 1024.0
    work_disk_gb: float = 512.0
    worker_raw_disk_gb: float = 200.0
    worker_work_disk_gb: float = 200.0
    boot_disk_gb: float = 50.0
    disk_type: str = "pd-balanced"
    disk_keep_days: float = 2.0
    mirror_raw: bool = True
    raw_lifecycle_days: tuple[int, int, int] = RAW_LIFECYCLE_DAYS
    embedding_dim: int = 768
    embedding_bytes: int = 2
    artifact_keep_days: float = 365.0
    checkpoint_keep_days: float = 30.0

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
    out += [
        "",
        f"### Prices (USD, us-central1, read on {PRICES_READ_ON})",
        "",
        "| key | price | unit | source |",
    ]
    out.append("| --- | --- | --- | --- |")
    for key, p in PRICES.items():
        flag = " **verify**" if p.verify else ""
        out.append(f"| `{key}` | {p.usd:g}{flag} | {p.unit} | {p.source} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    d = Inputs()
    p = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.costs",
        description="Estimate the Google Cloud cost of one preprocessing run (prices: costs.PRICES).",
    )
    p.add_argument(
        "--images", type=float, default=d.images, help="image/metadata pairs to embed (%(default)g)"
    )
    p.add_argument(
        "--images-per-s",
        type=float,
        default=d.images_per_s,
        help="embedding throughput of one L4 (%(default)g)",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--spot", dest="spot", action="store_true", default=True, help="Spot VMs (default)")
    model.add_argument(
        "--on-demand", dest="spot", action="store_false", help="on-demand VMs (no preemptions)"
    )
    p.add_argument(
        "--preemption-rate-per-day",
        type=float,
        default=d.preemptions_per_day,
        help="Spot preemptions per day of VM time (%(default)g)",
    )
    p.add_argument(
        "--checkpoint-interval-min",
        type=float,
        default=d.checkpoint_interval_min,
        help="work lost per preemption is half of this (%(default)g)",
    )
    p.add_argument(
        "--restart-min",
        type=float,
        default=d.restart_min,
        help="VM time to come back after a preemption: boot, driver check, resume (%(default)g)",
    )
    p.add_argument(
        "--capacity-wait-h",
        type=float,
        default=d.capacity_wait_h,
        help="wall time without a VM after each preemption (%(default)g)",
    )
    p.add_argument(
        "--setup-h", type=float, default=d.setup_h, help="first boot: driver, uv sync (%(default)g)"
    )
    p.add_argument("--archives-gb", type=float, default=d.archives_gb, help="(%(default)g)")
    p.add_argument("--download-mb-s", type=float, default=d.download_mb_s, help="per VM (%(default)g)")
    p.add_argument(
        "--read-mb-s", type=float, default=d.read_mb_s, help="tar indexing read rate (%(default)g)"
    )
    p.add_argument("--tail-h", type=float, default=d.tail_h, help="KNN, assembly, upload (%(default)g)")
    p.add_argument(
        "--workers", type=int, default=d.workers, help="1: one VM; N: Cloud Batch tasks (%(default)d)"
    )
    p.add_argument("--disk-type", default=d.disk_type, choices=["pd-balanced", "pd-standard", "pd-ssd"])
    p.add_argument(
        "--disk-keep-days",
        type=float,
        default=d.disk_keep_days,
        help="days the data disks are kept after the run (%(default)g)",
    )
    p.add_argument(
        "--no-raw-mirror",
        dest="mirror_raw",
        action="store_false",
        help="the archives are not mirrored to the raw bucket",
    )
    p.add_argument("--raw-nearline-days", type=int, default=d.raw_lifecycle_days[0])
    p.add_argument("--raw-coldline-days", type=int, default=d.raw_lifecycle_days[1])
    p.add_argument("--raw-delete-days", type=int, default=d.raw_lifecycle_days[2])
    p.add_argument("--artifact-keep-days", type=float, default=d.artifact_keep_days, help="(%(default)g)")
    p.add_argument("--checkpoint-keep-days", type=float, default=d.checkpoint_keep_days, help="(%(default)g)")
    p.add_argument("--embedding-bytes", type=int, default=d.embedding_bytes, help="2: float16, 4: float32")
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
        inp = Inputs(
            images=args.images,
            images_per_s=args.images_per_s,
            spot=args.spot,
            preemptions_per_day=args.preemption_rate_per_day,
            checkpoint_interval_min=args.checkpoint_interval_min,
            restart_min=args.restart_min,
            capacity_wait_h=args.capacity_wait_h,
            setup_h=args.setup_h,
            archives_gb=args.archives_gb,
            download_mb_s=args.download_mb_s,
            read_mb_s=args.read_mb_s,
            tail_h=args.tail_h,
            workers=args.workers,
            disk_type=args.disk_type,
            disk_keep_days=args.disk_keep_days,
            mirror_raw=args.mirror_raw,
            raw_lifecycle_days=(args.raw_nearline_days, args.raw_coldline_days, args.raw_delete_days),
            artifact_keep_days=args.artifact_keep_days,
            checkpoint_keep_days=args.checkpoint_keep_days,
            embedding_bytes=args.embedding_bytes,
        )
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
