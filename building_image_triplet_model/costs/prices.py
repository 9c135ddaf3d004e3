"""Every price the cost model (costs/model.py) uses, with its unit, its source and
the date it was read: one place, so that re-reading the pricing pages means editing only this file.

Prices marked ``verify`` are list prices that could not be confirmed from a primary source when they were
read: check them against the Google Cloud pricing pages (or the Cloud Billing catalog) before relying on them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRICES", "PRICES_READ_ON", "Price"]

PRICES_READ_ON = "2026-11-29"


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
