"""The aria2c manifest (manifest.py) and the scale-out share of it (work_split.py)."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from building_image_triplet_model.inputs import manifest, work_split
from building_image_triplet_model.inputs.manifest import ManifestError

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "data" / "downloads" / "raw_archives.txt"
SAMPLE = REPO / "data" / "downloads" / "raw_archives_sample.txt"
UPSTREAM = "https://datasets.epfl.ch/vilab/eccv16/dataset_unaligned/"
# The 54 archives of the 3D Street View dataset's unaligned release.
_NAMES = (
    "0003 0004 0009 0012 0014 0017 0020 0022 0024 0026 0028 0030 0032 0033 0035 0036 0058 0059 0060 0061 "
    "0062 0063 0064 0065 0067 0068 0069 0070 0071 0072 0073 0074 0075 0076 0077 0078 0079 0080 0081 0083 "
    "0084 0085 0086 0087 0088 0089 0090 0091 0092 0093 0094 0095 0096 0097"
)
DATASET = _NAMES.split()


def run_split(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.endswith("TASK_INDEX") and "TASK_COUNT" not in k}
    return subprocess.run(
        [sys.executable, "-m", "building_image_triplet_model.inputs.work_split", *args],
        cwd=REPO,
        env={**full_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def refusal(text: str, where: str = "m.txt") -> str:
    with pytest.raises(ManifestError) as err:
        manifest.parse(text, where)
    return str(err.value)


# ------------------------------------------------------------------------------ the committed manifests
def test_full_manifest_is_the_upstream_list():
    entries = manifest.load(FULL)
    assert len(DATASET) == 54 and len(set(DATASET)) == 54
    assert manifest.archives(FULL) == DATASET
    assert len(entries) == 56
    assert [e.archive for e in entries] == [*DATASET, None, None]
    assert [e.out for e in entries[-2:]] == ["dataset_unaligned/Readme.rtf", "dataset_unaligned/Readme.txt"]
    for e in entries:
        name = e.out.rsplit("/", 1)[1]
        assert e.uri == UPSTREAM + name and e.kind == "http"
        assert e.out == f"dataset_unaligned/{name}" and e.checksum is None and e.src is None
    assert [e.line for e in entries] == list(range(1, 113, 2))
    assert work_split.manifest_sources(FULL) == DATASET


def test_sample_manifest_copies_local_files(tmp_path, monkeypatch):
    entries = manifest.load(SAMPLE, repo_root=REPO)
    assert [e.archive for e in entries] == ["0003", "0004", "0009"]
    assert all(e.kind == "file" for e in entries)
    assert [e.src for e in entries] == [
        str(REPO / "build" / "sample_archives" / f"{n}.tar") for n in ("0003", "0004", "0009")
    ]
    assert [e.out for e in entries] == [f"dataset_unaligned/{n}.tar" for n in ("0003", "0004", "0009")]
    assert entries[0].line == 5  # after the comment lines
    monkeypatch.chdir(tmp_path)  # without repo_root a relative file:// path is from the current directory
    assert manifest.load(SAMPLE)[0].src == str(tmp_path / "build" / "sample_archives" / "0003.tar")


# ---------------------------------------------------------------------------------------------- parse
def test_parse_details():
    text = (
        "# a comment\n"
        "\n"
        "https://host.example/path/0001.tar?sig=abc\n"
        "  out=dl/0001.tar\n"
        "\tchecksum=sha-256=0123abcdEF\n"
        "gs://bucket/raw/0002.tar\n"
        "file:///abs/0003.tar\n"
        "   # an indented comment\n"
        "file://rel/dir/0004.tar\r\n"
        "\tout=x/0004.tar\r\n"
        "ftp://mirror.example/0005.tar\n"
    )
    entries = manifest.parse(text, "m.txt", repo_root=Path("/repo"))
    assert [(e.kind, e.out, e.line, e.archive) for e in entries] == [
        ("http", "dl/0001.tar", 3, "0001"),
        ("gs", "0002.tar", 6, "0002"),
        ("file", "0003.tar", 7, "0003"),
        ("file", "x/0004.tar", 9, "0004"),
        ("http", "0005.tar", 11, "0005"),
    ]
    assert entries[0].uri == "https://host.example/path/0001.tar?sig=abc"
    assert entries[0].checksum == "sha-256=0123abcdEF"
    assert entries[2].src == "/abs/0003.tar" and entries[3].src == "/repo/rel/dir/0004.tar"
    assert entries[1].src is None


def test_archive_names():
    def archive(out: str) -> str | None:
        return manifest.Entry("https://h/x", "http", out, 1).archive

    assert archive("dataset_unaligned/0088.tar") == "0088"
    assert archive("0088.tar") == "0088"
    assert archive("a/b-c_1.2.tar") == "b-c_1.2"
    assert archive("Readme.txt") is None and archive("0088.tar.aria2") is None and archive("x.tar.gz") is None


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("https://h/0001.tar\n\ton-download-complete=/bin/sh\n", 2, "unsupported option"),
        ("https://h/0001.tar\n\tdir=/tmp\n", 2, "unsupported option"),
        ("https://h/0001.tar\n\tout\n", 2, "unsupported option"),
        ("https://h/0001.tar\n\tout=../x.tar\n", 2, "must be a relative path"),
        ("https://h/0001.tar\n\tout=a/../../x.tar\n", 2, "must be a relative path"),
        ("https://h/0001.tar\n\tout=/etc/x.tar\n", 2, "must be a relative path"),
        ("https://h/0001.tar\n\tout=./x.tar\n", 2, "must be a relative path"),
        ("https://h/0001.tar\n\tout=\n", 2, "must be a relative path"),
        ("https://h/0001.tar\n\tout=a b.tar\n", 2, "must be a relative path"),
        ("https://h/0001.tar\n\tchecksum=sha-256=xyz\n", 2, "bad checksum"),
        ("https://h/0001.tar\n\tchecksum=crc32=abcd\n", 2, "bad checksum"),
        ("# c\nhttps://h/$(reboot).tar\n", 2, "not allowed"),
        ("https://h/a;rm -rf x.tar\n", 1, "not allowed"),
        ("https://h/a`id`.tar\n", 1, "not allowed"),
        ("https://h/a|b.tar\n", 1, "not allowed"),
        ("https://h/a&b.tar\n", 1, "not allowed"),
        ("https://h/a'b.tar\n", 1, "not allowed"),
        ('https://h/a"b.tar\n', 1, "not allowed"),
        ("https://h/a>b.tar\n", 1, "not allowed"),
        ("https://h/a\\b.tar\n", 1, "not allowed"),
        ("https://h/${HOME}.tar\n", 1, "not allowed"),
        ("file://../x.tar\n", 1, "must stay inside the repository"),
        ("file://a/../../x.tar\n", 1, "must stay inside the repository"),
        ("file://./x.tar\n", 1, "must stay inside the repository"),
        ("ftp2://h/a.tar\n", 1, "unsupported URI"),
        ("s3://bucket/a.tar\n", 1, "unsupported URI"),
        ("scp://h/a.tar\n", 1, "unsupported URI"),
        ("/abs/a.tar\n", 1, "unsupported URI"),
        ("a.tar\n", 1, "unsupported URI"),
        ("http:/h/a.tar\n", 1, "unsupported URI"),
        ("http:///a.tar\n", 1, "unsupported URI"),
        ("data:text/plain,a.tar\n", 1, "unsupported URI"),
        ("\tout=a.tar\nhttps://h/a.tar\n", 1, "option line before any URI"),
        ("# first a comment\n  out=a.tar\n", 2, "option line before any URI"),
        ("https://h/ok.tar\nhttps://h/a:b\n", 2, "cannot derive a file name"),
        pytest.param(
            "https://a/0001.tar\n\tout=d/0001.tar\nhttps://b/0001.tar\n\tout=d/0001.tar\n",
            3,
            "several entries write d/0001.tar (lines 1 and 3)",
            id="duplicate_out",
        ),
    ],
)
def test_refusals_name_file_and_line(text, line, what):
    msg = refusal(text, "downloads/m.txt")
    assert msg.startswith(f"downloads/m.txt:{line}: "), msg
    assert what in msg


@pytest.mark.parametrize(
    "text",
    [
        "https://a/0001.tar\n\tout=d/0001.tar\nhttps://b/0001.tar\n\tout=d/0001.tar\n",
        "https://a/0001.tar\nhttps://b/other/0001.tar\n",  # the same derived name
        "https://a/0001.tar\n\tout=0002.tar\nhttps://b/0002.tar\n",
    ],
)
def test_duplicate_outs_are_refused(text):
    msg = refusal(text, "m.txt")
    assert msg.startswith("m.txt") and "several entries write" in msg
    assert re.search(r"several entries write \S*000[12]\.tar", msg)


def test_load_names_the_path(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("https://h/0001.tar\n\tout=../x\n")
    with pytest.raises(ManifestError, match=re.escape(f"{path}:2: ")):
        manifest.load(path)
    path.write_bytes(b"https://h/\xff.tar\n")
    with pytest.raises(ManifestError, match=re.escape(f"{path}: cannot be read")):
        manifest.load(path)
    with pytest.raises(ManifestError, match="cannot be read"):
        manifest.load(tmp_path / "missing.txt")


def test_empty_manifest_has_no_entries():
    assert manifest.parse("# nothing yet\n\n") == []


def test_safe_relative():
    assert manifest.safe_relative("a/b/0001.tar") and manifest.safe_relative("a+b/c-d_e.f")
    for bad in ("", "/a", "a/", "a//b", "..", "a/../b", "./a", "a/.", "a b", "a\\b", "~/a", "a:b"):
        assert not manifest.safe_relative(bad), bad


# --------------------------------------------------------------------------------------------- render
def _facts(entries):
    return [(e.uri, e.kind, e.out, e.checksum, e.src) for e in entries]


def test_render_round_trips_through_parse():
    text = (
        "# header\n"
        "https://h/p/0001.tar\n\tout=dl/0001.tar\n\tchecksum=md5=00ff\n"
        "gs://b/0002.tar\n"
        "file://rel/0003.tar\n"
        "file:///abs/0004.tar\n\tout=z/0004.tar\n"
        "https://h/Readme.txt\n"
    )
    entries = manifest.parse(text, "m", repo_root=Path("/r"))
    rendered = manifest.render(entries)
    again = manifest.parse(rendered, "m2", repo_root=Path("/r"))
    assert _facts(again) == _facts(entries)
    assert manifest.render(again) == rendered  # a fixed point
    assert rendered.startswith(
        "https://h/p/0001.tar\n\tout=dl/0001.tar\n\tchecksum=md5=00ff\ngs://b/0002.tar\n"
    )
    assert "\tout=0002.tar\n" in rendered  # a derived out is written out


def test_render_with_out_prefix():
    entries = manifest.parse("https://h/0001.tar\n\tout=d/0001.tar\nhttps://h/0002.tar\n")
    staged = manifest.parse(manifest.render(entries, out_prefix=".staging/"))
    assert [e.out for e in staged] == [".staging/d/0001.tar", ".staging/0002.tar"]
    assert [e.archive for e in staged] == ["0001", "0002"]


@pytest.mark.parametrize("path", [FULL, SAMPLE], ids=["full", "sample"])
def test_committed_manifests_round_trip(path):
    entries = manifest.load(path, repo_root=REPO)
    assert _facts(manifest.parse(manifest.render(entries), repo_root=REPO)) == _facts(entries)


def test_render_of_nothing():
    assert manifest.render([]) == "\n"
    assert manifest.parse(manifest.render([])) == []


# ------------------------------------------------------------------------------------------ task_share
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 54, 60])
def test_task_share_partitions_the_archives(count):
    for names in (DATASET, [f"{i:04d}" for i in range(10)], ["a"], []):
        shares = [work_split.task_share(list(names), i, count) for i in range(count)]
        flat = list(itertools.chain.from_iterable(shares))
        assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))  # each to exactly one task
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)


def test_task_share_is_deterministic_and_independent_of_input_order():
    shuffled = DATASET[::-1][10:] + DATASET[::-1][:10]
    for i in range(3):
        assert work_split.task_share(shuffled, i, 3) == work_split.task_share(DATASET, i, 3)
    assert work_split.task_share(DATASET, 1, 3) == DATASET[1::3]
    assert work_split.task_share(DATASET, 1, 3)[:3] == ["0004", "0014", "0022"]


@pytest.mark.parametrize(("index", "count"), [(3, 3), (-1, 3), (0, 0), (0, -1)])
def test_task_share_refuses_impossible_tasks(index, count):
    with pytest.raises(ValueError, match="task index"):
        work_split.task_share(DATASET, index, count)


def test_task_from_env():
    assert work_split.task_from_env({"TASK_INDEX": "2", "TASK_COUNT": "5"}) == (2, 5)
    assert work_split.task_from_env({"BATCH_TASK_INDEX": "1", "BATCH_TASK_COUNT": "4"}) == (1, 4)
    both = {"TASK_INDEX": "0", "TASK_COUNT": "2", "BATCH_TASK_INDEX": "1", "BATCH_TASK_COUNT": "4"}
    assert work_split.task_from_env(both) == (0, 2)
    assert work_split.task_from_env({"TASK_INDEX": "0", "BATCH_TASK_COUNT": "4"}) is None
    assert work_split.task_from_env({}) is None


def test_share_entries_keeps_each_archives_lines_and_drops_other_files():
    entries = manifest.load(FULL)
    mine = work_split.share_entries(entries, (1, 3))
    assert [e.archive for e in mine] == DATASET[1::3]
    all_shares = [e for i in range(3) for e in work_split.share_entries(entries, (i, 3))]
    assert sorted(e.archive for e in all_shares) == DATASET  # the readmes belong to no worker


# ------------------------------------------------------------------------------------- the real command
def test_work_split_names_as_a_subprocess():
    proc = run_split("--manifest", str(FULL), "--task-index", "1", "--task-count", "3", "--names")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == DATASET[1::3]
    assert len(proc.stdout.splitlines()) == 18


def test_work_split_entries_as_a_subprocess():
    proc = run_split("--manifest", str(FULL), "--task-index", "0", "--task-count", "4")
    assert proc.returncode == 0, proc.stderr
    printed = manifest.parse(proc.stdout)
    assert [e.archive for e in printed] == DATASET[0::4]
    assert all(e.uri == UPSTREAM + f"{e.archive}.tar" for e in printed)


def test_work_split_reads_the_task_from_the_environment():
    proc = run_split(
        "--manifest", str(FULL), "--names", env={"BATCH_TASK_INDEX": "2", "BATCH_TASK_COUNT": "5"}
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == DATASET[2::5]


def test_work_split_usage_errors():
    proc = run_split("--manifest", str(FULL), "--names")
    assert proc.returncode == 2 and "--task-index" in proc.stderr
    proc = run_split("--manifest", str(FULL), "--task-index", "1")
    assert proc.returncode == 2 and "--task-count" in proc.stderr
    proc = run_split("--manifest", str(FULL), "--task-index", "3", "--task-count", "3")
    assert proc.returncode == 2 and "work_split: task index 3 is not in [0, 3)" in proc.stderr
    assert proc.stdout == ""


def test_work_split_refuses_a_bad_manifest(tmp_path):
    bad = tmp_path / "m.txt"
    bad.write_text("https://h/0001.tar\n\ton-download-complete=/bin/sh\n")
    proc = run_split("--manifest", str(bad), "--task-index", "0", "--task-count", "1")
    assert proc.returncode == 2 and f"{bad}:2: unsupported option" in proc.stderr and proc.stdout == ""


def test_work_split_explicit_task_count_is_not_overridden_by_the_environment():
    proc = run_split(
        "--manifest", str(FULL), "--task-count", "3", "--names", env={"TASK_INDEX": "0", "TASK_COUNT": "5"}
    )
    assert proc.returncode == 2 or proc.stdout.splitlines() == DATASET[0::3]
