#!/usr/bin/env bash
# Extract every NNNN.tar found under RAW_DIR (depth <= 2) into EXTRACT_DIR/NNNN/, safely and resumably.
#
#   extract_archives.sh --raw-dir RAW_DIR --extract-dir EXTRACT_DIR [--summary-json FILE] [--verify-only]
#                       [--skip]
#
# - Each archive is extracted into EXTRACT_DIR/.triplet-extract/NNNN.partial/, flushed to disk, renamed to
#   EXTRACT_DIR/NNNN/ when complete, and only then marked done (EXTRACT_DIR/.triplet-extract/NNNN.json,
#   with the archive's size and mtime). An interrupted extraction is redone from scratch, never skipped:
#   a leftover .partial folder, or an NNNN/ folder without its marker, is removed first.
# - Before anything is written, every member is checked (building_image_triplet_model/vm/extract_check.py):
#   absolute names, '..', links pointing outside, members reached through a link, device/fifo members and
#   a truncated archive make the whole archive refused (nothing of it is extracted). GNU tar then extracts
#   with --no-same-owner --no-same-permissions.
# - A full disk (or any tar error) fails the archive without marking it done, and the phase fails.
# - --skip (or TRIPLET_SKIP_EXTRACT=1): do nothing, because the engine reads the archives in place.
# - An archive with an aria2c control file beside it is an unfinished download: it is not extracted.
#
# Exit: 0 every archive extracted or already done; 1 some failed or were refused; 2 usage.
# Summary counts (log line and --summary-json): archives, extracted, skipped, failed, files_written.
set -Eeuo pipefail
# shellcheck source=gcp/scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  sed -n '2,/^set -Eeuo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

RAW_DIR="" EXTRACT_DIR="" SUMMARY_JSON="" VERIFY_ONLY=0 SKIP="${TRIPLET_SKIP_EXTRACT:-0}"
while (($#)); do
  case "$1" in
    --raw-dir) RAW_DIR="${2:?--raw-dir needs a value}"; shift 2 ;;
    --extract-dir) EXTRACT_DIR="${2:?--extract-dir needs a value}"; shift 2 ;;
    --summary-json) SUMMARY_JSON="${2:?}"; shift 2 ;;
    --verify-only) VERIFY_ONLY=1; shift ;;
    --skip) SKIP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "extract_archives.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

write_summary() { [[ -z "$SUMMARY_JSON" ]] || vm vm.extract_check summary "$SUMMARY_JSON" "$@"; }

if [[ "$SKIP" == 1 ]]; then
  log "extraction skipped (the engine reads the archives in place)"
  write_summary skipped_phase=true archives=0 extracted=0 skipped=0 failed=0 files_written=0
  exit 0
fi
[[ -n "$RAW_DIR" && -n "$EXTRACT_DIR" ]] || { usage >&2; exit 2; }
[[ -d "$RAW_DIR" ]] || TRIPLET_DIE_CODE=2 die "raw folder not found: $RAW_DIR"
mkdir -p "$EXTRACT_DIR"
EXTRACT_DIR="$(cd "$EXTRACT_DIR" && pwd)"
META="$EXTRACT_DIR/.triplet-extract"
mkdir -p "$META"

mapfile -t ARCHIVES < <(find "$RAW_DIR" -maxdepth 2 -type f -name '*.tar' ! -path '*/.triplet-*' | sort)

# done_ok ARCHIVE ID: marker present, folder present, archive unchanged since.
done_ok() { vm vm.extract_check is-done "$EXTRACT_DIR" "$2" "$1"; }

if ((VERIFY_ONLY)); then
  bad=0
  for a in "${ARCHIVES[@]}"; do
    id="$(basename "$a" .tar)"
    [[ -e "$a.aria2" ]] && continue
    done_ok "$a" "$id" || { log "verify: $id not extracted"; bad=$((bad + 1)); }
  done
  ((bad == 0)) || exit 1
  log "verify: all ${#ARCHIVES[@]} archives extracted"
  exit 0
fi

CURRENT_PARTIAL=""
on_term() {
  trap '' TERM INT
  log "SIGTERM: stopping extraction; ${CURRENT_PARTIAL:-nothing} stays unmarked and is redone next time"
  kill_tree "$$" TERM
  exit 143
}
trap on_term TERM INT

extracted=0 skipped=0 failed=0 files_written=0
declare -a failures=()
for archive in "${ARCHIVES[@]}"; do
  id="$(basename "$archive" .tar)"
  if [[ ! "$id" =~ ^[A-Za-z0-9._-]+$ ]]; then
    warn "$archive: unusual name, not extracted"
    failed=$((failed + 1)) failures+=("$archive: unusual name")
    continue
  fi
  if [[ -e "$archive.aria2" ]]; then
    warn "$archive: download not finished (aria2c control file present), not extracted"
    failed=$((failed + 1)) failures+=("$archive: download not finished")
    continue
  fi
  if done_ok "$archive" "$id"; then
    skipped=$((skipped + 1))
    continue
  fi
  final="$EXTRACT_DIR/$id"
  partial="$META/$id.partial"
  # Whatever is there without a valid marker is an interrupted (or stale) extraction: redo it.
  rm -f "$META/$id.json"
  rm -rf -- "$partial" "$final"
  if ! counts="$(vm vm.extract_check check "$archive" 2> >(stamp_lines))"; then
    warn "$archive: refused (unsafe members, see above); nothing extracted"
    failed=$((failed + 1)) failures+=("$archive: refused")
    continue
  fi
  n_files="${counts%%$'\t'*}"
  mkdir -p "$partial"
  CURRENT_PARTIAL="$partial"
  log "extracting $archive -> $final (${n_files} files)"
  if ! run_logged tar -x -f "$archive" -C "$partial" --no-same-owner --no-same-permissions \
    --no-overwrite-dir --delay-directory-restore; then
    warn "$archive: tar failed (disk full?); not marked done"
    rm -rf -- "$partial"
    failed=$((failed + 1)) failures+=("$archive: tar failed")
    CURRENT_PARTIAL=""
    continue
  fi
  # Durable before it is renamed and marked: a crash after the marker must not find holes.
  sync -f "$partial" 2>/dev/null || sync
  mv -T -- "$partial" "$final"
  sync -f "$EXTRACT_DIR" 2>/dev/null || true
  vm vm.extract_check mark "$EXTRACT_DIR" "$id" "$archive" "$n_files"
  CURRENT_PARTIAL=""
  extracted=$((extracted + 1))
  files_written=$((files_written + n_files))
done

log "extract summary: archives=${#ARCHIVES[@]} extracted=${extracted} skipped=${skipped} failed=${failed} files_written=${files_written}"
write_summary archives="${#ARCHIVES[@]}" extracted="$extracted" skipped="$skipped" failed="$failed" \
  files_written="$files_written"
if ((failed > 0)); then
  for f in "${failures[@]}"; do log "failed: $f"; done
  die "extraction failed for ${failed} of ${#ARCHIVES[@]} archives"
fi
