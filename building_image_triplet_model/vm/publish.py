"""What the VM does with a complete run: publish the artifact, then stop or delete itself (on-done)."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from building_image_triplet_model.io import durable
from building_image_triplet_model.io.progress import utc_now
from building_image_triplet_model.remote import cloud_sync

log = logging.getLogger(__name__)


def upload_artifact(s: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """The finalize phase: the artifact to output-uri, then its _SUCCESS.json (the commit marker)."""
    h5 = Path(s["engine"]["output"])
    out = s["output-uri"].rstrip("/")
    if not out:
        log.warning("finalize: no output-uri (and no checkpoint-uri): the artifact stays at %s", h5)
        return 0, {"artifact": str(h5), "uploaded": False}
    log.info("finalize: uploading %s to %s/%s (verified by size and CRC32C)", h5, out, h5.name)
    try:
        info = cloud_sync.upload_file(h5, f"{out}/{h5.name}")
        summary = {
            "artifact_uri": f"{out}/{h5.name}",
            "size": info.size,
            "crc32c": cloud_sync.crc32c_of_file(h5),
            "run_id": s["run-id"],
            "finished_at": utc_now(),
        }
        cloud_sync.write_text(f"{out}/_SUCCESS.json", durable.dumps_json(summary))  # after the artifact
    except (cloud_sync.CloudSyncError, OSError) as exc:
        log.warning("finalize: upload failed: %s", exc)
        return 1, None
    return 0, summary


def on_done(s: dict[str, Any], env: dict[str, str]) -> int:
    """triplet-on-done: stop or delete this VM (through its managed group, which would recreate it)."""
    action = s["on-done"]
    if action == "none":
        log.info("done: on-done=none; the VM keeps running")
        return 0
    from .settings import metadata_from_env

    md = metadata_from_env(env)
    if md.mode == "off":
        log.info("done: on-done=%s, but there is no metadata server (dry run): nothing to %s", action, action)
        return 0
    name, zone, project = (
        md.get("instance/name") or "",
        (md.get("instance/zone") or "").rsplit("/", 1)[-1],
        md.get("project/project-id") or "",
    )
    checks = (
        (name, r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", "instance name"),
        (zone, r"[a-z]+-[a-z]+[0-9]+-[a-z]", "zone"),
        (project, r"[a-z][-a-z0-9.:]{4,61}[a-z0-9]", "project id"),
    )
    for value, pattern, what in checks:
        if not re.fullmatch(pattern, value):
            log.error("done: odd %s %r", what, value)
            return 1
    if s["deploy-mode"] == "mig":
        created = md.get("instance/attributes/created-by") or ""
        m = re.fullmatch(
            r"projects/[^/]+/(zones|regions)/([a-z0-9-]+)/instanceGroupManagers/([a-z]([-a-z0-9]{0,61}[a-z0-9])?)",
            created,
        )
        if not m:
            log.error("done: created-by is not an instance group manager")
            return 1
        where = f"--{'zone' if m.group(1) == 'zones' else 'region'}={m.group(2)}"
        verb = "stop-instances" if action == "stop" else "delete-instances"
        cmd = ["compute", "instance-groups", "managed", verb, m.group(3), f"--instances={name}", where]
    elif action == "stop":
        cmd = ["compute", "instances", "stop", name, f"--zone={zone}"]
    else:
        cmd = ["compute", "instances", "delete", name, f"--zone={zone}", "--keep-disks=data"]
    cmd += [f"--project={project}", "--quiet"]
    gcloud = env.get("TRIPLET_GCLOUD", "gcloud")
    log.info("done: on-done=%s: gcloud %s (the VM's service account)", action, " ".join(cmd))
    base = float(env.get("TRIPLET_RETRY_BASE_S", "2"))
    for attempt in range(5):
        if subprocess.run([gcloud, *cmd], env=env).returncode == 0:
            return 0
        time.sleep(min(60.0, base * 2**attempt))
    return 1
