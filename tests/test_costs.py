"""The cost model: arithmetic, consistency with the lifecycle rules and with docs/costs.md, command line."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest

from building_image_triplet_model.costs import cost_report
from building_image_triplet_model.costs import model as costs
from building_image_triplet_model.costs.model import PRICES, Inputs, estimate

REPO = Path(__file__).resolve().parents[1]


def test_every_price_has_a_source_a_unit_and_one_read_date() -> None:
    dt.date.fromisoformat(costs.PRICES_READ_ON)
    for key, price in PRICES.items():
        assert price.usd >= 0, key
        assert price.unit, key
        assert len(price.source) > 20, key
    assert PRICES["vm.g2-standard-16.spot"].usd < PRICES["vm.g2-standard-16.on_demand"].usd


def test_vm_hours_without_preemptions_are_the_sum_of_the_phases() -> None:
    inp = Inputs(
        images=7.2e6, images_per_s=200, spot=False, archives_gb=360, download_mb_s=100, read_mb_s=200
    )
    est = estimate(inp)
    assert est.embed_h == pytest.approx(10.0)
    expected = inp.setup_h + 1.0 + 0.5 + 10.0 + inp.tail_h  # download 1 h, index 0.5 h, merge on the VM
    assert est.vm_h_per_worker == pytest.approx(expected)
    assert est.preemptions == 0
    assert est.lines["GPU VMs"] == pytest.approx(expected * PRICES["vm.g2-standard-16.on_demand"].usd)


def test_preemptions_stretch_the_run_by_the_work_they_lose() -> None:
    inp = Inputs(spot=True, preemptions_per_day=2.0, chunk_interval_s=900, restart_min=15)
    est = estimate(inp)
    loss = 0.25 + 0.25
    assert inp.loss_per_preemption_h == pytest.approx(loss)
    assert est.vm_h_per_worker == pytest.approx(est.base_vm_h / (1 - 2.0 * loss / 24))
    assert est.preemptions == pytest.approx(2.0 * est.vm_h_per_worker / 24)
    assert est.wall_h == pytest.approx(est.vm_h_per_worker + est.preemptions * inp.capacity_wait_h)
    calm = estimate(replace(inp, preemptions_per_day=0.0))
    assert calm.vm_h_per_worker == pytest.approx(calm.base_vm_h)
    assert est.total > calm.total


def test_spot_is_cheaper_than_on_demand_but_not_faster() -> None:
    spot, on_demand = estimate(Inputs(spot=True)), estimate(Inputs(spot=False))
    assert spot.lines["GPU VMs"] < 0.5 * on_demand.lines["GPU VMs"]
    assert spot.total < on_demand.total
    assert spot.wall_h > on_demand.wall_h


@pytest.mark.parametrize("field", ["images", "preemptions_per_day", "disk_keep_days", "artifact_keep_days"])
def test_cost_grows_with_every_quantity(field: str) -> None:
    base = Inputs()
    more = replace(base, **{field: getattr(base, field) * 2 + 1})
    assert estimate(more).total > estimate(base).total


def test_cost_falls_as_throughput_rises() -> None:
    totals = [estimate(Inputs(images_per_s=ips)).total for ips in (100, 150, 200, 250, 300)]
    assert totals == sorted(totals, reverse=True)


def test_batch_divides_the_work_and_adds_a_merge_vm() -> None:
    one, eight = estimate(Inputs(workers=1)), estimate(Inputs(workers=8))
    assert eight.embed_h == pytest.approx(one.embed_h / 8)
    assert eight.wall_h < one.wall_h / 3
    assert "merge VM (CPU)" in eight.lines
    assert "merge VM (CPU)" not in one.lines
    # A Batch retry starts on a fresh VM: it repeats the setup.
    assert Inputs(workers=8).loss_per_preemption_h == pytest.approx(Inputs().loss_per_preemption_h + 0.5)


def test_raw_lifecycle_days_match_the_bucket_rules() -> None:
    rules = json.loads((REPO / "gcp" / "lifecycle" / "raw-bucket.json").read_text())["rule"]
    nearline = next(r for r in rules if r["action"].get("storageClass") == "NEARLINE")["condition"]["age"]
    coldline = next(r for r in rules if r["action"].get("storageClass") == "COLDLINE")["condition"]["age"]
    delete = next(r for r in rules if r["action"]["type"] == "Delete")["condition"]["age"]
    assert (nearline, coldline, delete) == costs.RAW_LIFECYCLE_DAYS
    # Early-deletion minimums: Nearline 30 days, Coldline 90 days.
    assert coldline - nearline >= 30
    assert delete - coldline >= 90


def test_raw_mirror_cost_follows_the_schedule() -> None:
    est = estimate(Inputs(archives_gb=100, raw_lifecycle_days=(30, 90, 365)))
    month = costs.DAYS_PER_MONTH
    expected = 100 * (0.020 * 30 + 0.010 * 60 + 0.004 * 275) / month
    assert est.lines["raw archive mirror (lifecycle)"] == pytest.approx(expected)
    assert "raw archive mirror (lifecycle)" not in estimate(Inputs(mirror_raw=False)).lines


@pytest.mark.parametrize(
    "kwargs",
    [
        {"images": 0},
        {"images_per_s": -1},
        {"workers": 0},
        {"preemptions_per_day": -1},
        {"preemptions_per_day": 500.0},
        {"raw_lifecycle_days": (90, 30, 365)},
        {"disk_type": "hyperdisk-extreme"},
    ],
)
def test_impossible_inputs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"."):
        Inputs(**kwargs)  # type: ignore[arg-type]


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert costs.main(["--images", "2e7", "--images-per-s", "150", "--on-demand"]) == 0
    text = capsys.readouterr().out
    assert "on-demand" in text
    assert "total" in text
    assert costs.main(["--json", "--workers", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"]["workers"] == 4
    assert data["total"] == pytest.approx(sum(data["lines"].values()))
    assert costs.main(["--preemption-rate-per-day", "500"]) == 2
    assert "never finishes" in capsys.readouterr().err
    assert costs.main(["--prices"]) == 0
    assert "vm.g2-standard-16.spot" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        costs.main(["--help"])
    assert exc.value.code == 0


def test_module_help_is_fast_and_imports_nothing_heavy() -> None:
    code = (
        "import sys, runpy; sys.argv = ['costs', '--help']\n"
        "try:\n    runpy.run_module('building_image_triplet_model.costs', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'timm', 'h5py') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert "--images-per-s" in out
    assert "HEAVY []" in out


def test_docs_show_the_tables_this_module_prints() -> None:
    doc = (REPO / "docs" / "costs.md").read_text()
    m = re.search(r"<!-- costs:begin -->\n(.*?)\n<!-- costs:end -->", doc, flags=re.S)
    assert m, "docs/costs.md lacks the generated block"
    assert m.group(1).strip() == cost_report.render_markdown().strip(), (
        "docs/costs.md is stale: run `make costs-docs`"
    )


def test_update_doc_rewrites_only_the_block(tmp_path: Path) -> None:
    doc = tmp_path / "costs.md"
    doc.write_text("intro\n<!-- costs:begin -->\nold\n<!-- costs:end -->\noutro\n")
    assert costs.main(["--update-doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n<!-- costs:begin -->\n### The real dataset")
    assert text.endswith("\n<!-- costs:end -->\noutro\n")
    assert cost_report.update_doc(str(doc)) is False
    doc.write_text("no block\n")
    assert costs.main(["--update-doc", str(doc)]) == 2


def _other_value(action: argparse.Action) -> object:
    """A value for an option that differs from its default (and that Inputs accepts)."""
    if action.choices:
        return next(c for c in action.choices if c != action.default)
    assert action.type in (int, float), f"{action.option_strings}: pick a test value for {action.type}"
    return action.default + 1


def _flat(inp: Inputs) -> dict[str, object]:
    """The fields of inp, a tuple's elements as ``name[i]``: an option may set one element."""
    out: dict[str, object] = {}
    for name, value in asdict(inp).items():
        if isinstance(value, tuple):
            out.update({f"{name}[{i}]": x for i, x in enumerate(value)})
        else:
            out[name] = value
    return out


def test_every_input_is_defined_once_and_the_command_line_sets_it() -> None:
    """Each option the parser has for an input sets exactly one Inputs field (or one element of a tuple), the
    one it is named after; every field either has options (generated from its definition) or declares none."""
    parser = costs._parser()
    outputs = {"help", "json", "markdown", "prices", "update_doc"}
    target: dict[str, str] = {}  # option -> the field (or tuple element) it sets
    switches: dict[str, object] = {}  # switch -> the value it sets
    for action in parser._actions:
        if action.dest in outputs:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch: start from the opposite value so that it has something to change
            parser.set_defaults(**{action.dest: not action.const})
            argv, value = [flag], action.const
            switches[flag] = value
        else:
            value = _other_value(action)
            argv = [flag, str(value)]
        before = _flat(costs._inputs_from(parser.parse_args([])))
        after = _flat(costs._inputs_from(parser.parse_args(argv)))
        parser.set_defaults(**{action.dest: action.default})
        changed = {key: x for key, x in after.items() if x != before[key]}
        assert list(changed.values()) == [value], (flag, value, changed)
        target[flag] = next(iter(changed))
    for f in fields(Inputs):
        assert "help" in f.metadata, f"{f.name}: define it with costs._input (default, help, options)"
        has_options = any(t.partition("[")[0] == f.name for t in target.values())
        assert has_options == f.metadata.get("cli", True), f.name
    # The options not named after their fields: their names are older than the fields'.
    renamed = {flag: t for flag, t in target.items() if flag != "--" + t.replace("_", "-")}
    assert renamed == {
        "--on-demand": "spot",
        "--preemption-rate-per-day": "preemptions_per_day",
        "--no-raw-mirror": "mirror_raw",
        "--raw-nearline-days": "raw_lifecycle_days[0]",
        "--raw-coldline-days": "raw_lifecycle_days[1]",
        "--raw-delete-days": "raw_lifecycle_days[2]",
    }
    assert switches == {"--spot": True, "--on-demand": False, "--no-raw-mirror": False}


def test_a_g2_machine_is_never_offered_pd_standard(capsys: pytest.CaptureFixture[str]) -> None:
    """G2 machines cannot attach Standard persistent disks: the option does not offer it, and the model
    refuses it for a G2 machine (issue 19)."""
    with pytest.raises(SystemExit) as exc:
        costs.main(["--disk-type", "pd-standard"])
    assert exc.value.code == 2
    assert "invalid choice: 'pd-standard'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="G2 machines cannot attach pd-standard"):
        Inputs(disk_type="pd-standard")
    with pytest.raises(SystemExit):
        costs.main(["--help"])
    assert "pd-standard" not in capsys.readouterr().out


def test_a_preemption_loses_one_embedding_chunk_interval_as_the_engine_does() -> None:
    """The disks survive a preemption (stateful in the group): the engine loses at most one
    embedding_chunk_interval_s of embedding work, not half a push interval (issue 19)."""
    import yaml

    vm = yaml.safe_load((REPO / "configs" / "vm.yaml").read_text())["data"]
    inp = Inputs()
    assert inp.chunk_interval_s == vm["embedding_chunk_interval_s"]
    assert inp.loss_per_preemption_h == pytest.approx(inp.chunk_interval_s / 3600 + inp.restart_min / 60)
    help_text = costs._parser().format_help()
    assert "half" not in help_text
    assert "embedding chunk interval" in help_text
    doc = (REPO / "docs" / "costs.md").read_text()
    assert "half a checkpoint interval" not in doc
    assert "one embedding chunk interval" in doc


def test_the_default_rate_is_the_estimate_or_a_measurement_and_says_which(tmp_path: Path) -> None:
    from building_image_triplet_model.costs import gpu_rate

    missing = gpu_rate.l4_rate(tmp_path / "gpu.json")
    assert (missing.kind, missing.images_per_s) == ("estimated", 135.0)
    assert 120 <= gpu_rate.ESTIMATED_IMAGES_PER_S <= 150
    # A --small run on a CPU is no measurement of the L4.
    small = REPO / "benchmarks" / "results" / "gpu_small_cpu.json"
    assert gpu_rate.l4_rate(small).kind == "estimated"
    doc = json.loads(small.read_text())
    doc["settings"].update(device="NVIDIA L4", small=False)
    doc["figures"]["pipeline_images_per_s"]["median"] = 143.2
    measured = tmp_path / "gpu.json"
    measured.write_text(json.dumps(doc))
    rate = gpu_rate.l4_rate(measured)
    assert (rate.kind, rate.images_per_s) == ("measured", 143.2)
    assert "NVIDIA L4" in rate.label
    measured.write_text("{not json")
    assert gpu_rate.l4_rate(measured).kind == "estimated"
    # The model's default is that rate, and its report says which it is.
    default = gpu_rate.l4_rate()
    assert Inputs().images_per_s == default.images_per_s
    text = cost_report.render_text(estimate(Inputs()))
    assert f"({default.kind}" in text
    given = cost_report.render_text(estimate(Inputs(images_per_s=180)))
    assert "180 img/s (given)" in given
    assert f"{default.kind}" in (REPO / "docs" / "costs.md").read_text()
