"""How many decode workers the VM runs: enough to feed an L4, not every core (issue 17).

One worker decodes and resizes a 640 px JPEG to 518 px at ~147 img/s (benchmarks/results/datapath.json);
an L4 embeds 120-220 img/s. The other cores belong to the download and the index that overlap the embedding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from building_image_triplet_model import config
from building_image_triplet_model.engine import machine

REPO = Path(__file__).resolve().parents[1]


def vm_config(tmp_path: Path) -> config.DataConfig:
    data = yaml.safe_load((REPO / "configs" / "vm.yaml").read_text())["data"]
    data.update(input_dir=str(tmp_path), hdf5_path=str(tmp_path / "out.h5"), pretrained=False)
    return config.from_mapping(data)


def test_the_vm_decodes_with_four_workers_on_sixteen_vcpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = vm_config(tmp_path)
    monkeypatch.setattr(machine, "cpu_count", lambda: 16)  # a g2-standard-16
    assert machine.decode_workers(cfg, "cuda") == machine.GPU_DECODE_WORKERS == 4
    assert machine.model_threads(cfg, "cuda") == 1


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 1), (4, 2), (6, 4), (64, 4)])
def test_the_gpu_default_never_takes_the_model_and_writer_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int, workers: int
) -> None:
    cfg = vm_config(tmp_path)
    monkeypatch.setattr(machine, "cpu_count", lambda: cores)
    assert machine.decode_workers(cfg, "cuda") == workers
    assert machine.decode_workers(cfg, "cpu") == cores  # on the CPU the model is the bound: one per core
