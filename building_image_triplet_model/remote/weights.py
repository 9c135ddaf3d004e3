"""Fetch the model's hub weights once and put them in the bucket, so that N Batch workers (and every
recreated VM) read them from there instead of each asking the hub for the same ~350 MB.

    python -m building_image_triplet_model.remote.weights --config configs/vm.yaml --to gs://BUCKET/weights
    gcp/provision.sh weights            # the same with PREPROCESS_CONFIG and gs://PROCESSED_BUCKET/weights

It fetches ``model.safetensors`` of the config's ``feature_model`` exactly as a run would (the hub cache,
else the hub: ``preflight``'s own resolution), and uploads it create-only, CRC32C-checked, to
``<to>/<hub id>/<sha256>/model.safetensors`` (its content names it: a new upload of other weights never
replaces it). Then set ``data.weights_path`` in the preprocess YAML to the printed gs:// URI: the VM's
config step downloads it once to the work disk (verified) and the engine loads that local file.

The model key does not change: it names the weights by their SHA-256 (``preflight.weights_digest``), the
same for the hub's cached blob and for this copy of the same bytes, so embeddings stored from either are
reused by the other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from building_image_triplet_model.exit_codes import Exit
from building_image_triplet_model.remote import cloud_sync


def publish(config_path: Path, to: str) -> str:
    """Upload the config's hub weights under ``to``; returns the object's URI."""
    from building_image_triplet_model import config
    from building_image_triplet_model.engine import preflight
    from building_image_triplet_model.engine.identity import file_sha256

    cfg = config.load(config_path)
    local = preflight._hub_weights(cfg.feature_model)
    import timm

    hub_id = timm.get_pretrained_cfg(cfg.feature_model).hf_hub_id  # type: ignore[union-attr]
    digest = file_sha256(local)
    uri = f"{to.rstrip('/')}/{hub_id}/{digest}/model.safetensors"
    try:
        info = cloud_sync.upload_file(local, uri, if_generation_match=0)
        action = "uploaded"
    except FileExistsError:
        info = cloud_sync.stat(uri)  # type: ignore[assignment]
        if info is None or info.crc32c not in (None, cloud_sync.crc32c_of_file(local)):
            raise cloud_sync.CloudSyncError(f"{uri} exists with other content") from None
        action = "already there"
    print(
        f"{cfg.feature_model}: sha256:{digest} ({info.size:,} bytes) {action}: {uri}\n"
        f"set data.weights_path: {uri} in the preprocess YAML; the VM's config step downloads it once to the "
        "work disk and the model key stays the one the hub's file gives",
        flush=True,
    )
    return uri


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.remote.weights",
        description="Fetch the config's hub weights once and put them in the bucket for every worker.",
    )
    ap.add_argument("--config", type=Path, required=True, help="the preprocess YAML (its feature_model)")
    ap.add_argument("--to", required=True, help="gs://BUCKET/PREFIX (or a local folder standing in)")
    args = ap.parse_args(argv)
    from building_image_triplet_model.errors import BackboneError, ConfigError

    try:
        publish(args.config, args.to)
    except ConfigError as exc:
        print(f"weights: {args.config}: {exc}", file=sys.stderr)
        return int(Exit.CONFIG)
    except BackboneError as exc:
        print(f"weights: {exc}", file=sys.stderr)
        return int(Exit.MODEL)
    except (cloud_sync.CloudSyncError, OSError) as exc:
        print(f"weights: {exc}", file=sys.stderr)
        return int(Exit.ERROR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
