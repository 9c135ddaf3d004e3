#!/usr/bin/env bash
# aria2c's --on-download-complete hook (download_archives.sh sets it; aria2c runs it as HOOK GID FILES PATH):
# commit the finished file at once, so that the engine starts on an archive while the next ones download.
# download_archives.sh commits whatever this did not (the hook is best effort).
set -Eeuo pipefail
# shellcheck source=gcp/scripts/lib.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"
TRIPLET_LOG_TAG=download_archives
staging="${TRIPLET_DL_RAW_DIR:?}/.triplet-downloads/partial/"
path="${3:-}"
[[ "$path" == "$staging"* ]] || exit 0
out="${path#"$staging"}"
if vm vm.downloads commit "$TRIPLET_DL_RAW_DIR" "$out" 2>/dev/null; then
  log "complete: $out"
fi
exit 0
