"""What the engine may write to and delete: only a work folder it created, never the input.

* **Apart from the input.** The work folder and every file of the output (the artifact and what sits beside
  it) may not equal, contain or lie inside ``input_dir``, nor it inside them: symbolic links resolved, checked
  before anything is written (a ``--fresh`` could otherwise remove archives, and with extracted folders the
  output's own files would become a dataset of the input).
* **A work folder is the engine's when it made it.** It says so with :data:`OWNER_MARKER`, written when the
  engine creates the folder (or finds it empty). An existing folder that is not empty and has no marker is
  refused, with one exception: a work folder of the release before the marker, recognised by
  :func:`made_before_the_marker`, is adopted (the marker is added), so that no one starts over.

Even in its own folder the engine deletes only the names the Layout defines (workdir.Layout.discard).

* **A shared embeddings folder** (``data.embeddings_dir``) obeys the same rules with its own marker,
  :data:`EMB_OWNER_MARKER`: apart from the input, apart from the work folder and the output's files, and
  refused when it exists, is not empty and has no marker. It belongs to every output naming it, so no single
  output deletes it: ``--fresh`` never touches it and ``--discard-embeddings`` is refused with it
  (:func:`check_discard`). Each output that used it records so in ``users/`` (:func:`record_user`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.errors import ConfigError
from building_image_triplet_model.io import durable
from building_image_triplet_model.io.progress import utc_now
from building_image_triplet_model.io.workdir import EMB_OWNER_MARKER, OWNER_MARKER, Layout

log = logging.getLogger(__name__)

OWNER = "building_image_triplet_model"
RUN_JSON_KEYS = {"started", "mode", "model_key", "pid"}  # run.json as the release before the marker wrote it
MODES = {"single", "worker", "merge"}


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _overlap(a: Path, b: Path) -> str | None:
    """How two resolved paths overlap: 'is', 'lies inside', 'contains', or None."""
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "lies inside"
    if b.is_relative_to(a):
        return "contains"
    return None


def check_apart_from_input(cfg: DataConfig, layout: Layout) -> None:
    """ConfigError (exit 2) when the work folder or a file of the output overlaps ``input_dir``."""
    inp = _real(Path(cfg.input_dir))
    ours = [("data.hdf5_path", layout.output)]
    ours += [("data.work_dir" if cfg.work_dir else "the work folder", layout.work)]
    if layout.shared_emb is not None:
        ours += [("data.embeddings_dir", layout.shared_emb)]
    beside = (layout.partial, layout.rejects, layout.stats, layout.log)
    ours += [(f"the output's file {p.name}", p) for p in beside]
    for what, path in ours:
        real = _real(path)
        how = _overlap(real, inp)
        if how is None:
            continue
        inside = how == "lies inside"
        extracted = " (with extracted folders its files would be read as a dataset)" if inside else ""
        raise ConfigError(
            f"{what} {_shown(path, real)} {how} data.input_dir {_shown(Path(cfg.input_dir), inp)}: the "
            f"engine writes and deletes only in its own folders, never in its input{extracted}; put the "
            "output and the work folder outside input_dir"
        )


def _shown(path: Path, real: Path) -> str:
    return str(path) if real == path.absolute() else f"{path} (resolved: {real})"


def _marker(work: Path) -> dict | None:
    try:
        m = durable.read_json(work / OWNER_MARKER)
    except durable.CorruptFileError:
        return None
    return m if isinstance(m, dict) and m.get("owner") == OWNER else None


def _layout_names(layout: Layout) -> dict[str, bool]:
    """Every name the work folder's top level may hold, and whether it is a folder."""
    files = (
        layout.lock,
        layout.run_json,
        layout.progress_json,
        layout.events,
        layout.cache,
        layout.plan,
        layout.plan_json,
        layout.assemble_json,
    )
    dirs = (layout.index_dir, layout.knn_root, layout.own_emb_root, layout.corrupt_dir)
    return {p.name: False for p in files} | {p.name: True for p in dirs}


def made_before_the_marker(layout: Layout) -> str | None:
    """None when ``layout.work`` is a work folder of the release before the marker; else why it is not.

    Recognised: every entry at its top level is one that release writes (names from the Layout, each a file
    or a folder as the Layout has it, or a temporary file of one of them), and its run.json (written at every
    start, after the lock) is a JSON object with exactly the keys that release wrote: started (text), mode
    (single, worker or merge), model_key (text) and pid (a number). A folder with any other entry is never
    adopted, whatever else it holds.
    """
    names = _layout_names(layout)
    for entry in sorted(layout.work.iterdir()):
        name = entry.name
        if name.endswith(durable.TMP_SUFFIX) and any(name.startswith(f".{n}.") for n in names):
            continue  # a write that a kill interrupted
        if name not in names:
            return f"it holds {name}, which no work folder has"
        if entry.is_symlink() or entry.is_dir() != names[name]:
            return f"its {name} is not a {'folder' if names[name] else 'regular file'}"
    run_json = layout.run_json
    try:
        run = json.loads(run_json.read_bytes()) if run_json.is_file() else None
    except (OSError, ValueError):
        run = None
    if not (
        isinstance(run, dict)
        and set(run) == RUN_JSON_KEYS
        and run["mode"] in MODES
        and isinstance(run["started"], str)
        and isinstance(run["model_key"], str)
        and isinstance(run["pid"], int)
    ):
        return f"it has no {run_json.name} as a run of this engine writes it"
    return None


def _refuse(layout: Layout, why: str) -> ConfigError:
    return ConfigError(
        f"{layout.work}: the work folder exists, is not empty and is not this engine's (no {OWNER_MARKER}, "
        f"and not a work folder of an earlier release: {why}); the engine writes only into a folder it "
        "created: set data.work_dir (or data.hdf5_path) to a new or empty folder"
    )


def _new(layout: Layout) -> str:
    """A new work folder: a file already at hdf5_path is replaced only when its stats file says the engine
    made it (a work folder removed to save space, the artifact kept)."""
    if not layout.output.is_file():
        return "new"
    try:
        stats = durable.read_json(layout.stats)
    except (durable.CorruptFileError, OSError):
        stats = None
    if not (isinstance(stats, dict) and stats.get("run_key")):
        raise ConfigError(
            f"{layout.output}: data.hdf5_path is an existing file that this engine did not make (no work "
            f"folder {layout.work}, no {layout.stats.name} of a run beside it); it would be replaced: move "
            "it away or choose another data.hdf5_path"
        )
    return "new"


def check_work_folder(layout: Layout) -> str:
    """Read-only: 'new' (absent or empty), 'ours' (the marker), 'earlier release' (adoptable); ConfigError
    (exit 2) naming the folder for anything else."""
    work = layout.work
    if not work.exists() and not work.is_symlink():
        return _new(layout)
    if not work.is_dir():
        raise ConfigError(f"{work}: the work folder is not a folder")
    if _marker(work) is not None:
        return "ours"
    # The marker is the first file written: a kill while it was written leaves only its temporary file.
    half = f".{OWNER_MARKER}."
    if all(e.name.startswith(half) and e.name.endswith(durable.TMP_SUFFIX) for e in work.iterdir()):
        return _new(layout)
    why = made_before_the_marker(layout)
    if why is not None:
        raise _refuse(layout, why)
    return "earlier release"


def claim_work_folder(layout: Layout) -> None:
    """Create the work folder, or adopt an empty one or one of the release before the marker, and mark it
    as the engine's; refuse any other (ConfigError). The marker is the first file the engine writes there."""
    state = check_work_folder(layout)
    if state == "ours":
        return
    layout.work.mkdir(parents=True, exist_ok=True)
    record = {"owner": OWNER, "output": str(layout.output), "created": utc_now()}
    if state == "earlier release":
        record["adopted"] = "a work folder of the release before this marker, recognised by its own files"
        log.info("%s: a work folder of an earlier release: adopted (nothing in it is lost)", layout.work)
    durable.write_json(layout.owner_marker, record)


# ---------------------------------------------------------------------------- a shared embeddings folder
def _emb_marker(folder: Path) -> dict | None:
    try:
        m = durable.read_json(folder / EMB_OWNER_MARKER)
    except durable.CorruptFileError:
        return None
    return m if isinstance(m, dict) and m.get("owner") == OWNER else None


def check_embeddings_folder(layout: Layout) -> None:
    """Read-only: ConfigError (exit 2) naming data.embeddings_dir when it overlaps the work folder or a file
    of the output, or exists, is not empty and is not this engine's (no marker)."""
    folder = layout.shared_emb
    if folder is None:
        return
    real = _real(folder)
    mine = [("the work folder", layout.work), ("data.hdf5_path", layout.output)]
    mine += [(f"the output's file {p.name}", p) for p in (layout.partial, layout.rejects, layout.stats)]
    for what, path in mine:
        how = _overlap(real, _real(path))
        if how is not None:
            raise ConfigError(
                f"data.embeddings_dir {_shown(folder, real)} {how} {what} {path}: a shared embeddings "
                "folder stands apart from every output (leave the key unset to keep them in the work folder)"
            )
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise ConfigError(f"{folder}: data.embeddings_dir is not a folder")
    if _emb_marker(folder) is not None:
        return
    half = f".{EMB_OWNER_MARKER}."
    if any(not (e.name.startswith(half) and e.name.endswith(durable.TMP_SUFFIX)) for e in folder.iterdir()):
        raise ConfigError(
            f"{folder}: data.embeddings_dir exists, is not empty and is not this engine's (no "
            f"{EMB_OWNER_MARKER}); the engine writes only into a folder it created: name a new or empty "
            "folder"
        )


def claim_embeddings_folder(layout: Layout) -> None:
    """Create data.embeddings_dir (or adopt an empty one) and mark it as the engine's."""
    folder = layout.shared_emb
    if folder is None or _emb_marker(folder) is not None:
        return
    check_embeddings_folder(layout)
    folder.mkdir(parents=True, exist_ok=True)
    durable.write_json(layout.emb_owner_marker, {"owner": OWNER, "kind": "embeddings", "created": utc_now()})


def read_users(layout: Layout) -> list[dict]:
    """Every output recorded as a user of the shared embeddings folder (none for a work folder's own)."""
    out = []
    if layout.shared_emb is not None and layout.emb_users.is_dir():
        for path in sorted(layout.emb_users.glob("*.json")):
            try:
                record = durable.read_json(path)
            except durable.CorruptFileError:
                continue
            if isinstance(record, dict) and isinstance(record.get("stores"), list):
                out.append(record)
    return out


def record_user(layout: Layout, model_key: str, stores: list[str]) -> None:
    """users/<output digest>.json: this output uses these stores (durable; rewritten when they change)."""
    if layout.shared_emb is None:
        return
    path = layout.emb_user_file()
    record = {"output": str(_real(layout.output)), "work_dir": str(_real(layout.work))}
    record |= {"model_key": model_key, "stores": sorted(stores)}
    try:
        old = durable.read_json(path) or {}
    except durable.CorruptFileError:
        old = {}
    if {k: old.get(k) for k in record} != record:
        durable.write_json(path, {**record, "updated": utc_now()})


def check_discard(layout: Layout, discard_embeddings: bool) -> None:
    """--discard-embeddings removes only a work folder's own embeddings: with a shared data.embeddings_dir
    it is refused (exit 2), naming the outputs recorded as using it, before anything is removed."""
    if not discard_embeddings or layout.shared_emb is None:
        return
    others = [u["output"] for u in read_users(layout) if u.get("output") != str(_real(layout.output))]
    users = f"; other outputs recorded as using it: {', '.join(others)}" if others else ""
    raise ConfigError(
        f"--discard-embeddings: data.embeddings_dir {layout.shared_emb} is shared by every output that names "
        f"it{users}; the engine never discards it for one output: use --fresh (which keeps it), or remove "
        "the folder yourself when no output needs it"
    )
