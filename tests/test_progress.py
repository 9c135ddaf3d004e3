"""A run a person can watch (progress.py): rates count work, not start-up; off a terminal one line per
interval; on a terminal log lines go above the bars (tqdm's logging redirection), never into one."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from building_image_triplet_model.io import progress
from building_image_triplet_model.io.progress import Progress

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \w+\[\d+\]: ")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def make(tmp_path: Path, **kwargs: object) -> Progress:
    return Progress(tmp_path / "progress.json", tmp_path / "events.jsonl", **kwargs)


def test_the_rate_counts_from_the_start_of_the_work_not_of_the_process(tmp_path, clock):
    p = make(tmp_path, bars=False)
    clock.now += 90  # imports, the model load, the plan: before the step starts
    p.start("embed", total=1000, unit="images")
    for _ in range(10):
        clock.now += 1
        p.advance("embed", 20)
    st = json.loads((tmp_path / "progress.json").read_text())["steps"]["embed"]
    assert st["rate"] == 20.0 and st["eta_s"] == (1000 - 200) / 20.0
    p.close()


def test_a_resumed_step_counts_only_this_runs_work(tmp_path, clock):
    p = make(tmp_path, bars=False)
    p.start("embed", total=1000, done=900, unit="images")
    clock.now += 2
    p.advance("embed", 50)
    st = p.state["steps"]["embed"]
    assert st["rate"] == 25.0 and st["eta_s"] == 2.0
    p.close()


def test_off_a_terminal_one_line_per_interval(tmp_path, clock, caplog):
    progress.setup_logging()
    logging.getLogger("building_image_triplet_model").propagate = True  # for caplog
    p = make(tmp_path, bars=False, log_every_s=30)
    with caplog.at_level(logging.INFO, logger="building_image_triplet_model"):
        p.start("index", total=3000, unit="images")
        for _ in range(300):  # 10 items a second for 300 s
            clock.now += 1
            p.advance("index", 10)
        p.finish("index")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("index: ")]
    assert len(lines) == 10, lines  # one every 30 s
    assert lines[0] == "index: 300/3000 images, 10.0/s, ETA 4.5 min"
    p.close()


def test_on_a_terminal_log_lines_go_above_the_bar(tmp_path, capsys):
    progress.setup_logging()
    log = logging.getLogger("building_image_triplet_model.engine.steps")
    p = make(tmp_path, bars=True)
    with p.console():
        p.start("embed", total=10, unit="images")
        p.advance("embed", 5)
        log.warning("a line in the middle of the work")
        p.advance("embed", 5)
        p.finish("embed")
    p.close()
    err = capsys.readouterr().err
    [line] = [seg for seg in err.split("\n") if "a line in the middle" in seg]
    shown = line.rsplit("\r", 1)[-1]  # what the terminal shows of that line once every \r is applied
    assert LOG_LINE.match(shown), repr(line)
    assert "embed:" in err and "10/10" in err  # the bar itself, with its count


def test_each_long_step_gets_a_bar_with_rate_and_eta(tmp_path, capsys):
    p = make(tmp_path, bars=True)
    for step, unit in (("index", "bytes"), ("knn", "targets"), ("embed", "images"), ("assemble", "images")):
        p.start(step, total=100, unit=unit)
        p.advance(step, 50)
        p.finish(step)
    p.close()
    err = capsys.readouterr().err
    for step in ("index", "knn", "embed", "assemble"):
        assert re.search(rf"{step}: +50%\|", err), step
    assert "<" in err and "/s]" in err  # tqdm's ETA and rate


# ------------------------------------------------------------------------------------ progress.json history
def nested_progress(levels: int) -> str:
    """progress.json as the release before the flat history wrote it after ``levels`` starts: each start
    nested the previous run's record in its own (built as text: json.dumps itself would recurse)."""
    run = "null"
    for pid in range(1, levels + 1):
        run = f'{{"pid": {pid}, "previous": {run}, "started": "t{pid}", "updated": "u{pid}"}}'
    return f'{{"run": {run}, "steps": {{"index": {{"done": 3, "total": 3, "status": "done"}}}}}}'


def test_the_history_is_flat_and_keeps_the_last_runs(tmp_path: Path) -> None:
    for _ in range(progress.HISTORY_RUNS + 5):
        p = make(tmp_path)
        p.close()
    state = json.loads((tmp_path / "progress.json").read_text())
    history = state["history"]
    assert len(history) == progress.HISTORY_RUNS
    assert all(not isinstance(v, dict | list) for h in history for v in h.values())
    assert "previous" not in state["run"]


def test_a_progress_file_nested_2000_deep_is_read_flat_and_bounded(tmp_path: Path) -> None:
    (tmp_path / "progress.json").write_text(nested_progress(2000))
    read = progress.read_progress(tmp_path / "progress.json")
    assert read["run"] == {"pid": 2000, "started": "t2000", "updated": "u2000"}
    assert [h["pid"] for h in read["history"]] == list(range(1999, 1999 - progress.HISTORY_RUNS, -1))
    p = make(tmp_path)
    p.close()
    state = json.loads((tmp_path / "progress.json").read_text())
    assert [h["pid"] for h in state["history"]][:3] == [2000, 1999, 1998]
    assert len(state["history"]) == progress.HISTORY_RUNS
    assert state["steps"]["index"]["done"] == 3


def test_every_event_line_has_one_schema(tmp_path: Path) -> None:
    """The engine's progress events, its warnings and the VM job's events share one Cloud Logging log: one
    writer (progress.write_event), one schema. The engine wrote ``ts`` where the job wrote ``time``."""
    p = make(tmp_path)
    p.start("index", total=2, unit="bytes")
    p.finish("index")
    handler = progress.JsonEventHandler(tmp_path / "events.jsonl")
    handler.emit(logging.LogRecord("pipeline", logging.WARNING, __file__, 1, "a warning", None, None))
    progress.write_event(tmp_path / "events.jsonl", "phase", source="job", message="phase download started")
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert {line["event"] for line in lines} == {"progress", "log", "phase"}
    for line in lines:
        assert list(line)[:3] == ["time", "severity", "event"], line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line["time"])
