"""Step 5 as the run sees it: which stores and tables make the artifact, its attributes, the rejects file,
and the stats file that is written last (assemble.py does the writing itself)."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from building_image_triplet_model.engine import identity, plan, space
from building_image_triplet_model.engine.artifact import assemble
from building_image_triplet_model.engine.context import RunContext
from building_image_triplet_model.engine.steps import run_key, store_of
from building_image_triplet_model.errors import Interrupted
from building_image_triplet_model.inputs import records
from building_image_triplet_model.io import durable, faults, workdir
from building_image_triplet_model.io.progress import utc_now

log = logging.getLogger(__name__)


def assemble_artifact(ctx: RunContext) -> None:
    cfg, layout, p = ctx.cfg, ctx.layout, ctx.plan
    assert p is not None
    key = run_key(ctx)
    if layout.output.exists() and artifact_key(layout.output) == key:
        return  # renamed into place by a run that stopped before its stats file
    first = np.cumsum([0] + [int(ctx.markers[n]["images"]) for n in ctx.names])
    parts = [
        assemble.Part(n, store_of(ctx, n), plan.source_rows(p, first, s), int(p["src_start"][s]))
        for s, n in enumerate(ctx.names)
    ]
    dim = model_dim(ctx)
    n = len(p["rows"])
    codes = assemble.gather_codes(parts, n)
    knn_dirs = {s: (layout.knn_split(ctx.knn_key, s), ctx.knn_ks[s]) for s in plan.SPLITS}
    progress = layout.assemble_progress(key)
    if progress and not assemble.skeleton_matches(layout.partial, progress):
        # Derived and as large as the artifact: written again, not kept aside like a corrupt store.
        log.warning(
            "%s does not hold the skeleton its progress record names (lost in a power cut?): "
            "assembling again",
            layout.partial,
        )
        progress = {}
    if not progress:
        space.check_artifact_space(layout.output, layout.partial, n, dim, cfg.embedding_dtype)
        # Progress is only ever valid for the skeleton it was made with: none until the new one is written.
        layout.assemble_json.unlink(missing_ok=True)
        log.info("assembling %s: writing the skeleton", layout.partial)
        offset = assemble.write_skeleton(
            layout.partial,
            ctx.cache,
            p,
            knn_dirs,
            codes,
            dim,
            cfg.embedding_dtype,
            artifact_attrs(ctx, key, codes, dim),
        )
        durable.fsync_file(layout.partial)  # before the marker that vouches for it
        faults.point("assemble.skeleton")
        progress = {"run_key": key, "offset": offset, "next": [0, 0], "rows": n}
        durable.write_json(layout.assemble_json, progress)
    ctx.progress.start("assemble", total=n, unit="images")
    complete = assemble.copy_embeddings(
        layout.partial,
        int(progress["offset"]),
        dim,
        cfg.embedding_dtype,
        parts,
        lambda m: durable.write_json(layout.assemble_json, m),
        progress,
        ctx.stop,
        on_rows=lambda k: ctx.progress.advance("assemble", k),
    )
    if not complete:
        raise Interrupted
    assemble.verify(layout.partial, parts, n, dim)
    faults.point("assemble.verified")
    os.replace(layout.partial, layout.output)
    durable.fsync_dir(layout.output.parent)
    layout.assemble_json.unlink(missing_ok=True)
    ctx.progress.finish("assemble")


def artifact_key(path: Any) -> str | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("run_key", ""))
    except OSError:
        return None


def model_dim(ctx: RunContext) -> int:
    if ctx.resolved is not None:
        return ctx.resolved.output_size
    recorded = durable.read_json(ctx.layout.model_json(ctx.model_key)) or {}
    return int(recorded.get("dim") or 0)


def artifact_attrs(ctx: RunContext, key: str, codes: np.ndarray, dim: int) -> dict[str, Any]:
    model = durable.read_json(ctx.layout.model_json(ctx.model_key)) or {}
    ident = model.get("identity", {})
    stats = summary(ctx, codes)
    return {
        "feature_model": ctx.cfg.feature_model,
        "image_size": int(ident.get("input_size", [0, 0, 0])[-1]),
        "precision": str(ident.get("precision")),
        "weights": str(ident.get("weights")),
        "run_key": key,
        "plan_key": ctx.plan_key,
        "model_key": ctx.model_key,
        "settings": {**identity.selection(ctx.cfg), "knn_k": ctx.cfg.knn_k, "model": ident},
        "n_images": stats["images"],
        "n_valid_images": stats["valid_images"],
        "n_targets": stats["targets"],
        "targets_per_split": stats["targets_per_split"],
        "rejects": stats["rejects"],
        "knn_distance_unit": "m",
        "embedding_dtype": ctx.cfg.embedding_dtype,
    }


def summary(ctx: RunContext, codes: np.ndarray) -> dict[str, Any]:
    """The artifact's counts; rejects by reason, and by who found them (the index or the decoder)."""
    p = ctx.plan
    assert p is not None
    found_index = dict(
        sorted(
            (records.REJECT_REASONS[c], int(k))
            for c, k in zip(*np.unique(ctx.cache["rej_reason"], return_counts=True), strict=True)
        )
    )
    bad = codes[codes != 0]
    found_decode = dict(
        sorted(
            (records.REJECT_REASONS[c], int(k))
            for c, k in zip(*np.unique(bad, return_counts=True), strict=True)
        )
    )
    rejects = {**found_index}
    for reason, k in found_decode.items():
        rejects[reason] = rejects.get(reason, 0) + k
    return {
        "images": len(p["rows"]),
        "valid_images": int((codes == 0).sum()),
        "targets": len(p["target_keys"]),
        "targets_per_split": {s: int((p["target_split"] == i).sum()) for i, s in enumerate(plan.SPLITS)},
        "sources": ctx.names,
        "source_rows": dict(zip(ctx.names, plan.source_counts(p), strict=True)),
        "rejects": dict(sorted(rejects.items())),
        "rejects_found_by": {"index": found_index, "decoder": found_decode},
    }


def finish(ctx: RunContext) -> dict[str, Any]:
    """The rejects file, then the stats file: the commit marker of the whole run, written last."""
    layout, p = ctx.layout, ctx.plan
    assert p is not None
    import h5py

    with h5py.File(layout.output, "r") as f:
        codes = f["images/reject_reason"][()]
    write_rejects(ctx, codes)
    stats = summary(ctx, codes)
    stats.update(
        run_key=run_key(ctx),
        plan_key=ctx.plan_key,
        knn_key=ctx.knn_key,
        model_key=ctx.model_key,
        images_embedded=ctx.counts.images_embedded,
        images_reused=len(p["rows"]) - ctx.counts.images_embedded,
        completed=utc_now(),
    )
    workdir.commit(layout.stats, stats)  # the whole run's marker, last
    return stats


def write_rejects(ctx: RunContext, codes: np.ndarray) -> None:
    cache, names = ctx.cache, ctx.names
    lines = ["source\tpath\treason\tdetail"]
    for src, path, code, detail in zip(
        cache["rej_source_idx"], cache["rej_path"], cache["rej_reason"], cache["rej_detail"], strict=True
    ):
        lines.append(
            f"{names[src]}\t{path.decode(errors='replace')}\t{records.REJECT_REASONS[code]}\t"
            f"{detail.decode(errors='replace')}"
        )
    assert ctx.plan is not None
    for i in np.flatnonzero(codes != 0):
        r = ctx.plan["rows"][i]
        lines.append(
            f"{names[cache['source_idx'][r]]}\t{cache['path'][r].decode(errors='replace')}\t"
            f"{records.REJECT_REASONS[codes[i]]}\tfound by the decoder"
        )
    durable.write_bytes(ctx.layout.rejects, ("\n".join(lines) + "\n").encode())
