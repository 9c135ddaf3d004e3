"""Helpers for the provisioning tests: dry-run command extraction, the real gcloud parser, the stand-in.

A uniquely named module (not conftest.py) so that `from provision_helpers import ...` is unambiguous.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROVISION = REPO / "gcp" / "provision.sh"
BATCH_SUBMIT = REPO / "gcp" / "batch_submit.sh"
HERE = Path(__file__).resolve().parent
PARSER_HARNESS = HERE / "gcloud_parse.py"
FAKE_GCLOUD = HERE / "fake_gcloud.py"
NO_ACCOUNT = "You do not currently have an active account selected"
BASH = shutil.which("bash") or "/bin/bash"


def find_gcloud_lib() -> Path | None:
    """The SDK's lib folder (holding googlecloudsdk/gcloud_main.py), or None when gcloud is not installed."""
    exe = shutil.which("gcloud")
    if exe is None:
        return None
    lib = Path(exe).resolve().parent.parent / "lib"
    if (lib / "googlecloudsdk" / "gcloud_main.py").is_file():
        return lib
    out = subprocess.run(
        [exe, "info", "--format=value(installation.sdk_root)"], capture_output=True, text=True, check=False
    )
    lib = Path(out.stdout.strip()) / "lib"
    return lib if (lib / "googlecloudsdk" / "gcloud_main.py").is_file() else None


@pytest.fixture(scope="session")
def gcloud_lib() -> Path:
    lib = find_gcloud_lib()
    if lib is None:
        if os.environ.get("REQUIRE_GCLOUD") == "1":
            pytest.fail("gcloud is not installed but REQUIRE_GCLOUD=1")
        pytest.skip("the Google Cloud CLI (gcloud) is not installed")
    return lib


def run_parser(lib: Path, commands: Sequence[Sequence[str]], workdir: Path) -> list[dict[str, object]]:
    """Runs every command (argv without 'gcloud') through the real CLI, in one process, with no account."""
    config_dir = workdir / "gcloud-config"
    config_dir.mkdir(parents=True, exist_ok=True)
    out = workdir / "parse-results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDSDK_", "GOOGLE_"))}
    env["CLOUDSDK_CONFIG"] = str(config_dir)
    env["CLOUDSDK_CORE_DISABLE_PROMPTS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-S", str(PARSER_HARNESS), str(lib), str(out)],
        input=json.dumps([list(c) for c in commands]),
        text=True,
        capture_output=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def rejected(results: Iterable[dict[str, object]]) -> list[str]:
    """Commands that did not get past gcloud's flag parsing and validation."""
    bad = []
    for r in results:
        ok = (r["code"] == 1 and NO_ACCOUNT in str(r["stderr"])) or r["code"] == 0
        if not ok:
            bad.append(
                f"gcloud {shlex.join(r['argv'])}  ->  exit {r['code']}: {str(r['stderr']).strip()[:400]}"
            )  # type: ignore[arg-type]
    return bad


def gcloud_lines(text: str) -> list[list[str]]:
    """The gcloud commands of a dry run: run lines and '# look:' lines, as argv lists without 'gcloud'."""
    commands = []
    for line in text.splitlines():
        if line.startswith("# look: "):
            line = line[len("# look: ") :]
        if line.startswith("gcloud "):
            words = shlex.split(line)
            commands.append(words[1:])
    return commands


def run_script(
    script: Path, args: Sequence[str], env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [BASH, str(script), *args], capture_output=True, text=True, env=full_env, check=False, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script.name} {shlex.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        )
    return proc


def make_run_files(tmp_path: Path) -> dict[str, Path]:
    """A preprocess YAML, a scripts folder and a manifest (independent of the other work in progress)."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("startup_preprocess.sh", "shutdown_preprocess.sh", "lib.sh", "download_archives.sh"):
        (scripts / name).write_text(f"#!/bin/bash\n# stand-in {name}\n")
    (scripts / "notes.txt").write_text("not uploaded\n")
    config = tmp_path / "preprocess.yaml"
    config.write_text("model:\n  name: vit_base_patch14_dinov2.lvd142m\n")
    manifest = tmp_path / "raw_archives.txt"
    manifest.write_text("https://example.invalid/0003.tar\n\tout=dataset_unaligned/0003.tar\n")
    return {"scripts": scripts, "config": config, "manifest": manifest}


@pytest.fixture
def run_files(tmp_path: Path) -> dict[str, Path]:
    return make_run_files(tmp_path)


def file_sets(files: dict[str, Path]) -> list[str]:
    return [
        "--set",
        f"PREPROCESS_CONFIG={files['config']}",
        "--set",
        f"SCRIPTS_DIR={files['scripts']}",
        "--set",
        f"MANIFEST_SOURCE={files['manifest']}",
    ]


@dataclass
class FakeCloud:
    """The stand-in gcloud on PATH, its state file and its call log."""

    bin_dir: Path
    state: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_GCLOUD_STATE": str(self.state),
            "FAKE_GCLOUD_LOG": str(self.log),
            "PROVISION_POLL_S": "0",  # the image builder powers off after a poll or two: no waiting
        }
        env.update(extra)
        return env

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def reset_log(self) -> None:
        self.log.write_text("")

    def read_state(self) -> dict[str, object]:
        return json.loads(self.state.read_text())

    def write_state(self, state: dict[str, object]) -> None:
        self.state.write_text(json.dumps(state))


@pytest.fixture
def fake_cloud(tmp_path: Path) -> FakeCloud:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "gcloud"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{FAKE_GCLOUD}" "$@"\n')
    wrapper.chmod(0o755)
    return FakeCloud(bin_dir=bin_dir, state=tmp_path / "cloud-state.json", log=tmp_path / "gcloud-calls.log")


MUTATING_VERBS = {
    "create",
    "enable",
    "add-metadata",
    "update",
    "add-iam-policy-binding",
    "remove-iam-policy-binding",
    "cp",
    "rm",
    "delete",
    "set-instance-template",
    "update-instances",
    "start",
    "undelete",
    "snapshot",
    "submit",
}
READ_VERBS = {
    "describe",
    "describe-from-family",
    "list",
    "get-iam-policy",
    "hash",
    "ls",
    "cat",
    "list-instances",
    "get-value",
}


def verb_path(argv: Sequence[str]) -> str:
    """'compute disks create' from ['compute', 'disks', 'create', 'raw-data-1tb', '--zone=...']."""
    words = []
    for w in argv:
        if w.startswith("-") or w.startswith("gs://") or "/" in w or "@" in w:
            break
        words.append(w)
        if w in MUTATING_VERBS or w in READ_VERBS:
            break
    return " ".join(words)


def mutations(calls: Iterable[Sequence[str]]) -> list[list[str]]:
    return [list(c) for c in calls if verb_path(c).split(" ")[-1] in MUTATING_VERBS]


CallFilter = Callable[[Sequence[str]], bool]


def checkout_copy(dest: Path, origin: str | None) -> Path:
    """A copy of this checkout's working tree (tracked and untracked files, not ignored ones: what the scripts
    see) in a new git repository whose `origin` remote is ``origin`` (None: no remote). The real repository
    and its remotes are not touched."""
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listing.split("\0")):
        src = REPO / rel
        if src.is_file():  # listed but deleted in the working tree: skipped
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    if origin is not None:
        subprocess.run(["git", "-C", str(dest), "remote", "add", "origin", origin], check=True)
    return dest


def current_branch(repo: Path = REPO) -> str:
    """The branch ``repo`` is on (what an empty REPO_REF means), or "" when HEAD is detached."""
    return subprocess.run(
        ["git", "-C", str(repo), "symbolic-ref", "--quiet", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


def git(repo: Path, *args: str) -> str:
    """A git command in ``repo`` (with a fixed identity, so that commits work on any machine)."""
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()


def bare_origin(path: Path) -> str:
    """A new, empty bare repository at ``path``: a real git remote on disk. Returns its file:// URL."""
    subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True)
    return f"file://{path}"


def commit_all(repo: Path, branch: str) -> str:
    """Commits the whole working tree of ``repo`` on ``branch`` (checked out); returns the commit."""
    git(repo, "checkout", "-q", "-B", branch)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", "provisioned tree")
    return git(repo, "rev-parse", "HEAD")


# Tests that name https://example.invalid/... as REPO_URL reach a real bare repository instead: git's own
# url.<base>.insteadOf, set through GIT_CONFIG_* for the scripts' `git ls-remote`. It holds one commit on the
# branches the tests' settings name: gcp, the default branch of `git init`, and this checkout's branch.
EXAMPLE_REMOTE = "https://example.invalid/"


@pytest.fixture(scope="session", autouse=True)
def example_remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("remotes")
    main = root / "triplets.git"
    bare_origin(main)
    work = root / "work"
    work.mkdir()
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    sha = commit_all(work, "gcp")
    branches = {"gcp", "main", "master", current_branch()} - {""}
    git(work, "push", "-q", f"file://{main}", *(f"{sha}:refs/heads/{b}" for b in sorted(branches)))
    for alias in ("x.git", "org/building-image-triplet-model.git"):
        (root / alias).parent.mkdir(parents=True, exist_ok=True)
        (root / alias).symlink_to(main)
    # This checkout's own origin too (a developer's clone): the dry runs of the scripts at REPO read the ref
    # there, and must not depend on the network or on what was pushed.
    own = subprocess.run(
        ["git", "-C", str(REPO), "config", "--get", "remote.origin.url"], capture_output=True, text=True
    ).stdout.strip()
    rewrites = [(f"url.file://{root}/.insteadOf", EXAMPLE_REMOTE)]
    if own:
        rewrites.append((f"url.file://{main}.insteadOf", own))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GIT_CONFIG_COUNT", str(len(rewrites)))
        for i, (key, value) in enumerate(rewrites):
            mp.setenv(f"GIT_CONFIG_KEY_{i}", key)
            mp.setenv(f"GIT_CONFIG_VALUE_{i}", value)
        yield root
