"""What a run has done and what the next one will do: read-only, any time, without torch.

Works on an absent, partial, interrupted or running output. The embedding stores are found by the model
spec (the config's model settings, identity.model_spec) that the run which made them recorded; each archive
is then

* ``reusable``: its store holds every image the plan needs;
* ``partial``: some of them (a run was interrupted, or the selection grew);
* ``pending``: none yet;
* ``stale``: the archive changed since its embeddings were made (they are not used; it is embedded again);
* ``not indexed``: not read yet, so not known.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.engine import done, identity, index, ownership, plan
from building_image_triplet_model.engine.embed.store import EmbeddingStore
from building_image_triplet_model.errors import InputError
from building_image_triplet_model.inputs.sources import list_sources
from building_image_triplet_model.inputs.work_split import manifest_sources
from building_image_triplet_model.io import durable
from building_image_triplet_model.io.progress import read_progress
from building_image_triplet_model.io.workdir import Layout, lock_holder

STEPS = ("index", "plan", "knn", "embed", "assemble")


def _read(path: Path) -> Any:
    try:
        return durable.read_json(path)
    except durable.CorruptFileError:
        return None  # the processor moves it aside and redoes it; the report says "not done"


def model_key_for(layout: Layout, cfg: DataConfig) -> str | None:
    """The model key a run with this config recorded, newest first (None: this model is new here)."""
    spec = identity.model_spec(cfg)
    found = []
    for path in layout.emb_root.glob("*/model.json"):
        m = _read(path) or {}
        if m.get("spec") == spec:
            found.append((m.get("created", ""), m.get("key", path.parent.name)))
    return max(found)[1] if found else None


def _current_plan(layout: Layout, cfg: DataConfig, names: list[str], markers: dict[str, Any]) -> dict | None:
    """The plan the next run uses: the stored one when its key is current, else computed (pure numpy)."""
    key = done.plan_key(cfg, names, markers)
    stored = None
    with contextlib.suppress(durable.CorruptFileError):  # damaged: the processor makes it again
        stored = done.stored_plan(layout, key)
    if stored is not None:
        return {"key": key, "stored": True, **stored}
    try:
        if index.read_cache_header(layout) == (names, [markers[n]["digest"] for n in names]):
            return {"key": key, "stored": False, **plan.make_plan(index.load_cache(layout), cfg)}
    except durable.CorruptFileError:
        pass
    return None


def archive_states(
    layout: Layout,
    cfg: DataConfig,
    names: list[str],
    markers: dict[str, Any],
    p: dict | None,
    model_key: str | None,
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s, name in enumerate(names):
        m = markers.get(name)
        if m is None:
            out[name] = {"state": "not indexed"}
            continue
        needed = done.rows_needed(p, names, markers, s) if p is not None else np.arange(m["images"])
        store_dirs = list(layout.model_dir(model_key).glob(f"{name}-*")) if model_key else []
        current = layout.store_dir(model_key, name, m["content"]) if model_key else None
        have = np.zeros(0, np.int64)
        if current is not None and current.is_dir():
            with contextlib.suppress(durable.CorruptFileError):
                have = EmbeddingStore(current, int(m["images"])).done_rows()
        missing = len(np.setdiff1d(needed, have))
        if missing == 0:
            state = "reusable"
        elif len(have):
            state = "partial"
        elif any(d != current for d in store_dirs) or m.get("stale"):
            state = "stale"
        else:
            state = "pending"
        out[name] = {
            "state": state,
            "images": len(needed),
            "to_embed": missing,
            "indexed": int(m["images"]),
            "targets": int(m["targets"]),
            "rejected": sum(m["rejects"].values()),
        }
    return out


def collect(cfg: DataConfig) -> dict[str, Any]:
    layout = Layout(cfg)
    report: dict[str, Any] = {"output": str(layout.output), "work_dir": str(layout.work), "steps": {}}
    steps = report["steps"]
    try:
        progress = read_progress(layout.progress_json)
    except durable.CorruptFileError:
        progress = {}
    report["running_pid"] = lock_holder(layout.lock)

    # index
    try:
        present = {s.name: s for s in list_sources(cfg.input_dir)}
        input_error = None
    except InputError as exc:
        present, input_error = {}, str(exc)
    names = manifest_sources(cfg.manifest) if cfg.manifest else sorted(present)
    markers: dict[str, Any] = {}
    for name in names:
        src = present.get(name)
        try:
            m = layout.index_marker(name, src.signature() if src else None)
        except durable.CorruptFileError:
            m = None
        if m:
            markers[name] = m
    rejects: dict[str, int] = {}
    for m in markers.values():
        for reason, count in m["rejects"].items():
            rejects[reason] = rejects.get(reason, 0) + count
    steps["index"] = {
        "status": _status(len(markers), len(names)),
        "archives_done": len(markers),
        "archives_total": len(names),
        "images_indexed": sum(m["images"] for m in markers.values()),
    }
    if input_error:
        steps["index"]["error"] = input_error

    # plan, KNN
    all_indexed = bool(names) and len(markers) == len(names)
    p = _current_plan(layout, cfg, names, markers) if all_indexed else None
    steps["plan"] = {"status": "done" if p is not None and p["stored"] else "pending"}
    knn: dict[str, Any] = {"status": "pending"}
    if p is not None:
        steps["plan"].update(images=len(p["rows"]), targets=len(p["target_keys"]))
        knn_key = identity.knn_key(p["key"], cfg.knn_k)
        sizes = {s: len(plan.split_targets(p, s)) for s in plan.SPLITS}
        report["splits"] = {
            s: {"targets": n, "images": int(p["target_images"][p["target_split"] == i].sum())}
            for i, (s, n) in enumerate(sizes.items())
        }
        report["knn_key"] = knn_key
        done = sum(layout.knn_rows_done(knn_key, s, n) for s, n in sizes.items())
        knn = {
            "status": _status(done, sum(sizes.values())),
            "rows_done": done,
            "rows_total": sum(sizes.values()),
        }
    steps["knn"] = knn

    # embed
    model_key = model_key_for(layout, cfg)
    archives = archive_states(layout, cfg, names, markers, p, model_key)
    to_embed = sum(a.get("to_embed", 0) for a in archives.values())
    total = sum(a.get("images", 0) for a in archives.values())
    unknown = sum(1 for a in archives.values() if a["state"] == "not indexed")
    status = _status(total - to_embed, total)
    if unknown and status == "done":
        status = "in progress"
    steps["embed"] = {
        "status": status,
        "images_done": total - to_embed,
        "images_to_embed": to_embed,
        "archives_not_indexed": unknown,
        "model_key": model_key or "new",
    }
    report["archives"] = archives
    shared_stores(layout, report, markers, model_key)

    # assemble
    stats = _read(layout.stats) or {}
    run_key = (
        identity.run_key(p["key"], identity.knn_key(p["key"], cfg.knn_k), model_key)
        if p and model_key
        else None
    )
    complete = bool(run_key and layout.output.exists() and stats.get("run_key") == run_key)
    asm = _read(layout.assemble_json) or {}
    if complete:
        steps["assemble"] = {"status": "done"}
    elif asm and layout.partial.exists() and asm.get("run_key") == run_key:
        steps["assemble"] = {"status": "in progress", "rows": asm.get("rows")}
    else:
        steps["assemble"] = {"status": "pending"}
        if layout.output.exists():
            steps["assemble"]["note"] = "the artifact there was made with other settings; it is replaced"
    report["complete"] = complete
    report["rejects"] = dict(sorted((stats.get("rejects") or rejects).items()))
    report["rejects_found_by"] = stats.get("rejects_found_by") or {"index": dict(sorted(rejects.items()))}
    for key in ("images_embedded", "images_reused"):
        if key in stats:
            report[key] = stats[key]
    last = progress.get("steps", {})
    for step, st in steps.items():
        prev = last.get(step, {})
        if prev.get("rate"):
            st["last_rate_per_s"], st["rate_unit"] = prev["rate"], prev.get("unit")
        if prev.get("eta_s") is not None and st["status"] != "done":
            st["last_eta_s"] = prev["eta_s"]
    report["last_run"] = progress.get("run")
    report["next_run"] = next_run(report)
    return report


def shared_stores(
    layout: Layout, report: dict[str, Any], markers: dict[str, Any], model_key: str | None
) -> None:
    """Where the stores are, and for a shared data.embeddings_dir each archive's store and the other outputs
    recorded as using it (ownership.record_user)."""
    report["embeddings_dir"] = str(layout.emb_root)
    report["embeddings_shared"] = layout.shared_emb is not None
    if layout.shared_emb is None or not model_key:
        return
    users = ownership.read_users(layout)
    me = os.path.realpath(layout.output)
    for name, a in report["archives"].items():
        if name in markers:
            store = f"{model_key}/{layout.store_dir(model_key, name, markers[name]['content']).name}"
            others = sorted(u["output"] for u in users if store in u["stores"] and u.get("output") != me)
            a.update(store=store, shared_with=others)


def _status(done: int, total: int) -> str:
    if total and done >= total:
        return "done"
    return "in progress" if done else "pending"


def next_run(report: dict[str, Any]) -> str:
    steps = report["steps"]
    if report["complete"]:
        return "nothing: the artifact is complete"
    if "error" in steps["index"] and not steps["index"]["archives_done"]:
        return f"fail: {steps['index']['error']}"
    emb = steps["embed"]
    parts = []
    if steps["index"]["status"] != "done":
        parts.append(f"index {steps['index']['archives_total'] - steps['index']['archives_done']} archive(s)")
    if emb["images_to_embed"] or emb["archives_not_indexed"]:
        more = f" and every image of {emb['archives_not_indexed']} archive(s) not indexed yet"
        parts.append(f"embed {emb['images_to_embed']} image(s){more if emb['archives_not_indexed'] else ''}")
    elif steps["index"]["status"] == "done":
        parts.append("embed nothing (every image needed is embedded)")
    for step, what in (("plan", "choose the images and splits"), ("knn", "compute the geographic KNN rows")):
        if steps[step]["status"] != "done":
            parts.append(what)
    parts.append("assemble the HDF5 artifact")
    return "; ".join(parts)


def render(report: dict[str, Any]) -> str:
    lines = [f"output: {report['output']}" + ("  [COMPLETE]" if report["complete"] else "")]
    if report["running_pid"]:
        lines.append(f"a processor is running now (pid {report['running_pid']})")
    for step in STEPS:
        st = report["steps"][step]
        detail = [
            f"{k}={v}"
            for k, v in st.items()
            if k not in ("status", "last_rate_per_s", "rate_unit", "last_eta_s")
        ]
        if st.get("last_rate_per_s"):
            rate, unit = st["last_rate_per_s"], st.get("rate_unit") or "items"
            detail.append(
                f"last rate {rate / 1e6:.1f} MB/s" if unit == "bytes" else f"last rate {rate:.1f} {unit}/s"
            )
        if st.get("last_eta_s") is not None:
            detail.append(f"ETA then {st['last_eta_s'] / 60:.1f} min")
        lines.append(f"  {step:<9} {st['status']:<12} {', '.join(detail)}")
    states: dict[str, list[str]] = {}
    for name, a in report["archives"].items():
        states.setdefault(a["state"], []).append(name)
    if states:
        lines.append(
            "archives: "
            + "; ".join(
                f"{k} {len(v)} ({' '.join(v[:8])}{' ...' if len(v) > 8 else ''})"
                for k, v in sorted(states.items())
            )
        )
    if report.get("embeddings_shared"):
        shared = {n: a["shared_with"] for n, a in report["archives"].items() if a.get("shared_with")}
        lines.append(
            f"embeddings: {report['embeddings_dir']} (shared folder; {len(shared)} of "
            f"{len(report['archives'])} archives' stores also used by other outputs)"
        )
        for name, others in list(shared.items())[:8]:
            lines.append(f"  shared store {report['archives'][name]['store']}: also {', '.join(others)}")
    if report["rejects"]:
        lines.append("rejects: " + ", ".join(f"{k}={v}" for k, v in report["rejects"].items()))
    by = report.get("rejects_found_by", {})
    for who in ("index", "decoder"):
        if by.get(who):
            lines.append(f"  found by the {who}: " + ", ".join(f"{k}={v}" for k, v in by[who].items()))
    if "images_embedded" in report:
        lines.append(
            f"last run: {report['images_embedded']} images embedded, {report['images_reused']} reused"
        )
    lines.append(f"next run: {report['next_run']}")
    return "\n".join(lines)
