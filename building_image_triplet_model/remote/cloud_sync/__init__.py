"""Incremental, verified push/pull between local folders and Cloud Storage (or a local folder standing in
for a bucket): :mod:`.locations` (what a location is, its two backends), :mod:`.sync` (our policy for a
folder), :mod:`.objects` (one object at a time), ``triplet-sync --help``.
"""

from building_image_triplet_model.remote.cloud_sync.locations import (
    ChecksumMismatchError,
    CloudSyncError,
    ObjectInfo,
    crc32c_of_file,
    is_gcs,
)
from building_image_triplet_model.remote.cloud_sync.objects import (
    download_file,
    exists,
    list_objects,
    read_text,
    stat,
    upload_file,
    write_text,
)
from building_image_triplet_model.remote.cloud_sync.sync import (
    DEFAULT_EXCLUDES,
    DEFAULT_MARKERS,
    SyncResult,
    pull_dir,
    push_dir,
)

__all__ = [
    "DEFAULT_EXCLUDES",
    "DEFAULT_MARKERS",
    "ChecksumMismatchError",
    "CloudSyncError",
    "ObjectInfo",
    "SyncResult",
    "crc32c_of_file",
    "download_file",
    "exists",
    "is_gcs",
    "list_objects",
    "pull_dir",
    "push_dir",
    "read_text",
    "stat",
    "upload_file",
    "write_text",
]
