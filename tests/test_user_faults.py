"""Faults of the user: one clear line and exit 2 within seconds, in bounded memory, from every command that
reads the config (the processor, the status command, the VM's config step); an artifact path that is a
folder; scale-out task numbers in the environment of a plain run. Real files, real subprocesses of the real
commands, each under an address-space limit so that a regression fails instead of eating the machine."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import REPO, load, manifest_of, tiny_config, write_config

from building_image_triplet_model.exit_codes import Exit

LIMIT_BYTES = 2 << 30  # 2 GiB of address space: the config readers need ~200 MB; the attacks grew past it
TORCH_LIMIT_BYTES = 8 << 30  # a run that imports torch maps ~5.2 GB of address space
SECONDS = 60  # a refusal takes a second or two; this much time means the reader is expanding something


def _bounded() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def _bounded_for_torch() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (TORCH_LIMIT_BYTES, TORCH_LIMIT_BYTES))


def bounded_run(
    module: str, *args: str, env: dict[str, str] | None = None, bounded: bool = True
) -> subprocess.CompletedProcess:
    """A real subprocess of the command, under LIMIT_BYTES of address space; ``bounded=False``: a run that
    loads torch, under TORCH_LIMIT_BYTES."""
    full_env = {k: v for k, v in os.environ.items() if "TASK_" not in k}
    return subprocess.run(
        [sys.executable, "-m", f"building_image_triplet_model.{module}", *args],
        cwd=REPO,
        env={**full_env, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=SECONDS if bounded else 600,
        preexec_fn=_bounded if bounded else _bounded_for_torch,
        start_new_session=True,
    )


def vm_config(tmp: Path, config_file: Path) -> subprocess.CompletedProcess:
    """The VM bootstrap's config step (the command startup_preprocess.sh runs), metadata off."""
    env = {
        "TRIPLET_METADATA": "off",
        "TRIPLET_REPO_DIR": str(REPO),
        "TRIPLET_MOUNT_RAW": str(tmp / "vm" / "raw"),
        "TRIPLET_MOUNT_WORK": str(tmp / "vm" / "work"),
        "TRIPLET_RUN_DIR": str(tmp / "vm" / "run"),
        "TRIPLET_PREPROCESS_CONFIG_FILE": str(config_file),
    }
    return bounded_run("vm", "config", env=env)


READERS = {
    "processor": lambda tmp, cfg: bounded_run("dataset_processor", "--config", str(cfg)),
    "status": lambda tmp, cfg: bounded_run("preprocess_resume", "--config", str(cfg)),
    "vm_config_step": vm_config,
}


def billion_laughs(tmp: Path) -> Path:
    """~560 bytes: nine levels of nine aliases, 9**9 strings once expanded, in a key every reader checks."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    text = (
        "\n".join(lines) + f"\ndata:\n  input_dir: {tmp}\n  hdf5_path: {tmp}/out/d.h5\n  feature_model: *l9\n"
    )
    path = tmp / "laughs.yaml"
    path.write_text(text)
    assert len(text) - 2 * len(str(tmp)) < 600  # the paths aside
    return path


def not_utf8(tmp: Path) -> Path:
    path = tmp / "latin1.yaml"
    path.write_bytes(f"data:\n  input_dir: {tmp}/caf\xe9\n  hdf5_path: {tmp}/out/d.h5\n".encode("latin-1"))
    return path


def absurd_batch(tmp: Path) -> Path:
    return write_config(
        tmp / "batch.yaml", input_dir=str(tmp), hdf5_path=str(tmp / "out" / "d.h5"), batch_size=100_000_000
    )


ATTACKS = {
    "billion_laughs": (billion_laughs, "aliases expand to more than"),
    "not_utf8": (not_utf8, "not UTF-8 text (byte"),
    "absurd_batch_size": (absurd_batch, "data.batch_size: must be <= 65536, got 100000000"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_config_attacks_are_one_line_exit_2_in_bounded_memory(
    tmp_path: Path, reader: str, attack: str
) -> None:
    make, words = ATTACKS[attack]
    cfg = make(tmp_path)
    r = READERS[reader](tmp_path, cfg)
    assert r.returncode == Exit.CONFIG, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if words in line]
    assert len(lines) == 1 and str(cfg) in lines[0], r.stderr[-2000:]
    assert len(r.stderr) < 2000  # never a whole expanded value
    assert not (tmp_path / "out").exists()


def test_a_message_never_prints_a_whole_value(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "long.yaml",
        input_dir=str(tmp_path),
        hdf5_path=str(tmp_path / "d.h5"),
        feature_model=["resnet18"] * 5000,
        seed="x" * 100_000,
    )
    for module in ("dataset_processor", "preprocess_resume"):
        r = bounded_run(module, "--config", str(cfg))
        assert r.returncode == Exit.CONFIG
        assert "data.feature_model: expected a non-empty string, got ['resnet18'," in r.stderr
        assert len(r.stderr) < 400, r.stderr[:1000]


def test_an_alias_or_two_is_still_fine(tmp_path: Path, archives: tuple[Path, dict]) -> None:
    """The bound is on what the aliases expand to, not on aliases: the trainer's files may use anchors."""
    cfg = tiny_config(tmp_path, archives[0])
    text = "defaults: &d {seed: 3}\n" + cfg.read_text() + "trainer_seed: *d\n"
    cfg.write_text(text)
    r = bounded_run("preprocess_resume", "--config", str(cfg))
    assert r.returncode == Exit.WORK_REMAINS, r.stderr[-2000:]


def test_an_artifact_path_that_is_a_folder_is_refused_at_start(tmp_path: Path, archives) -> None:
    cfg = tiny_config(tmp_path, archives[0])
    output = load(cfg)[1].output
    output.mkdir(parents=True)
    r = bounded_run("dataset_processor", "--config", str(cfg))
    assert r.returncode == Exit.CONFIG
    assert f"data.hdf5_path: {output} is a folder" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in output.parent.iterdir()) == ["dataset.h5"]  # nothing was indexed
    assert not any(output.iterdir())


def test_a_batch_the_machine_cannot_hold_is_refused_before_anything_is_written(
    tmp_path: Path, archives
) -> None:
    """Within the static bound, but not within this machine's memory once the model's input size is known:
    refused by the preflight (it used to run the index, the plan and KNN, then fail in the first batch)."""
    cfg = tiny_config(tmp_path, archives[0], image_size=518, batch_size=65_536)
    r = bounded_run("dataset_processor", "--config", str(cfg), bounded=False)
    assert r.returncode == Exit.CONFIG, r.stderr[-3000:]
    assert "data.batch_size: 65536 images of 518 px need about" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_task_numbers_in_the_environment_of_a_plain_run_make_no_worker(tmp_path: Path, archives) -> None:
    """Cloud Batch's variables left in a plain run's environment: the run is still a plain one, and writes
    its artifact (it used to become a worker that published nothing and exited 0)."""
    folder = archives[0]
    cfg = tiny_config(tmp_path, folder, manifest=str(manifest_of(tmp_path / "m.txt", folder)))
    r = bounded_run(
        "dataset_processor",
        "--config",
        str(cfg),
        env={"BATCH_TASK_INDEX": "1", "BATCH_TASK_COUNT": "2"},
        bounded=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert load(cfg)[1].output.is_file()


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        ((), {"TASK_INDEX": "one", "TASK_COUNT": "2"}, "TASK_INDEX='one' TASK_COUNT='2': task numbers"),
        ((), {"BATCH_TASK_INDEX": "3", "BATCH_TASK_COUNT": "2"}, "task 3 of 2 is not in [0, 2)"),
        (("--task-index", "-1", "--task-count", "2"), {}, "task -1 of 2 is not in [0, 2)"),
        (("--task-index", "0", "--task-count", "0"), {}, "task 0 of 0 is not in [0, 0)"),
    ],
)
def test_bad_task_numbers_are_exit_2_naming_them(tmp_path: Path, archives, args, env, words) -> None:
    folder = archives[0]
    cfg = tiny_config(tmp_path, folder, manifest=str(manifest_of(tmp_path / "m.txt", folder)))
    run_uri = str(tmp_path / "run")
    r = bounded_run("dataset_processor", "--config", str(cfg), "--run-uri", run_uri, *args, env=env)
    assert r.returncode == Exit.CONFIG, r.stderr[-3000:]
    assert words in r.stderr and "Traceback" not in r.stderr
    assert not Path(run_uri).exists()


def test_a_worker_needs_its_run_folder(tmp_path: Path, archives) -> None:
    folder = archives[0]
    cfg = tiny_config(tmp_path, folder, manifest=str(manifest_of(tmp_path / "m.txt", folder)))
    r = bounded_run("dataset_processor", "--config", str(cfg), "--task-index", "0", "--task-count", "2")
    assert r.returncode == Exit.CONFIG
    assert "a scale-out worker needs its run folder (--run-uri)" in r.stderr
