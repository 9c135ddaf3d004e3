#!/usr/bin/env bash
# Download the archives of an aria2c manifest into a folder, resumably.
#
#   download_archives.sh --manifest PATH|gs://URI --dir RAW_DIR [--summary-json FILE] [--verify-only]
#
# The manifest is aria2c's input format: a URI line, then option lines starting with a tab (`out=`,
# `checksum=`; nothing else is accepted, since aria2c options can run commands). A gs:// manifest is fetched
# (once, when the local copy is missing) into RAW_DIR/.triplet-downloads/manifests/.
#
# - http(s) entries: aria2c with resume-friendly options (continue, no preallocation, control file saved
#   every TRIPLET_ARIA2_AUTO_SAVE_INTERVAL s so that even a SIGKILL loses at most that much, retries,
#   parallel downloads). Rounds are retried with backoff. Partial files stay for the next attempt.
# - file:// entries (absolute, or relative to the repository) and gs:// entries are copied without aria2c,
#   through a temporary name.
# - An entry counts as downloaded only when aria2c finished it (no `.aria2` control file left) and, for a
#   `.tar`, it reads as a complete tar. Then a record (size, mtime) is kept in RAW_DIR/.triplet-downloads/,
#   so later runs skip it without reading it again.
#
# Exit: 0 all complete; 1 something is missing (the missing URLs are listed); 2 usage or bad manifest.
# Env: TRIPLET_ARIA2_JOBS (6), TRIPLET_ARIA2_SPLIT (1: one connection per file, so that a partial file's
# length is its progress even without a control file), TRIPLET_ARIA2_MAX_TRIES (10),
# TRIPLET_ARIA2_RETRY_WAIT (10), TRIPLET_ARIA2_AUTO_SAVE_INTERVAL (1), TRIPLET_DOWNLOAD_ROUNDS (3),
# TRIPLET_REPO_DIR (repository for relative file:// entries), TRIPLET_PYTHON (for gs:// entries).
set -Eeuo pipefail
# shellcheck source=gcp/scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${TRIPLET_ARIA2_JOBS:=6}"
: "${TRIPLET_ARIA2_SPLIT:=1}"
: "${TRIPLET_ARIA2_MAX_TRIES:=10}"
: "${TRIPLET_ARIA2_RETRY_WAIT:=10}"
: "${TRIPLET_ARIA2_AUTO_SAVE_INTERVAL:=1}"
: "${TRIPLET_DOWNLOAD_ROUNDS:=3}"
: "${TRIPLET_REPO_DIR:=$(script_repo_root)}"
: "${TRIPLET_PYTHON:=${TRIPLET_REPO_DIR}/.venv/bin/python}"

usage() {
  sed -n '2,/^set -Eeuo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

MANIFEST="" RAW_DIR="" SUMMARY_JSON="" VERIFY_ONLY=0
while (($#)); do
  case "$1" in
    --manifest) MANIFEST="${2:?--manifest needs a value}"; shift 2 ;;
    --dir | --raw-dir) RAW_DIR="${2:?--dir needs a value}"; shift 2 ;;
    --summary-json) SUMMARY_JSON="${2:?}"; shift 2 ;;
    --verify-only) VERIFY_ONLY=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "download_archives.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ -n "$MANIFEST" && -n "$RAW_DIR" ]] || { usage >&2; exit 2; }

mkdir -p "$RAW_DIR"
RAW_DIR="$(cd "$RAW_DIR" && pwd)"
STATE="$RAW_DIR/.triplet-downloads"
mkdir -p "$STATE"

cloud_sync() { PYTHONPATH="${TRIPLET_REPO_DIR}${PYTHONPATH:+:$PYTHONPATH}" "$TRIPLET_PYTHON" -m building_image_triplet_model.cloud_sync "$@"; }

# ---------------------------------------------------------------------------------------- the manifest
if [[ "$MANIFEST" == gs://* ]]; then
  local_manifest="$STATE/manifests/$(basename "$MANIFEST")"
  if [[ ! -s "$local_manifest" ]]; then
    mkdir -p "$STATE/manifests"
    log "fetching manifest $MANIFEST"
    retry 4 cloud_sync cp "$MANIFEST" "$local_manifest" || die "cannot fetch the manifest $MANIFEST"
  fi
  MANIFEST="$local_manifest"
elif [[ "$MANIFEST" != /* && ! -f "$MANIFEST" && -f "$TRIPLET_REPO_DIR/$MANIFEST" ]]; then
  MANIFEST="$TRIPLET_REPO_DIR/$MANIFEST"
fi
[[ -f "$MANIFEST" ]] || TRIPLET_DIE_CODE=2 die "manifest not found: $MANIFEST"

status_table() { helper manifest "$MANIFEST" "$RAW_DIR" --repo-root "$TRIPLET_REPO_DIR"; }
if ! table="$(status_table)"; then
  TRIPLET_DIE_CODE=2 die "bad manifest $MANIFEST (see above)"
fi

declare -a KIND=() URI=() OUT=() SRC=()
n_complete_before=0
while IFS=$'\t' read -r st kind uri out src _why; do
  [[ -n "$kind" ]] || continue
  KIND+=("$kind") URI+=("$uri") OUT+=("$out") SRC+=("$src")
  [[ "$st" == complete ]] && n_complete_before=$((n_complete_before + 1))
done <<<"$table"
n_entries=${#OUT[@]}
log "manifest $MANIFEST: ${n_entries} entries, ${n_complete_before} already complete in $RAW_DIR"

# is_complete INDEX: the record matches the file and no control file is left.
pending_outs() { status_table | awk -F'\t' '$1 == "pending" { print $4 }'; }

# verify_and_record OUT URI: the file is finished (no .aria2) and, for a tar, complete; then record it.
verify_and_record() {
  local out="$1" uri="$2" dest="$RAW_DIR/$1"
  [[ -f "$dest" && ! -e "$dest.aria2" ]] || return 1
  if [[ "$out" == *.tar ]]; then
    local why
    if ! why="$(helper tar-check "$dest" 2>&1)"; then
      warn "$out: $why"
      return 1
    fi
  fi
  helper record "$RAW_DIR" "$out" "$uri"
}

if ((VERIFY_ONLY)); then
  missing="$(pending_outs)"
  if [[ -n "$missing" ]]; then
    log "verify: not complete: $(tr '\n' ' ' <<<"$missing")"
    exit 1
  fi
  log "verify: all ${n_entries} entries complete"
  exit 0
fi

on_term() {
  trap '' TERM INT
  log "SIGTERM: stopping downloads (partial files and aria2c control files are kept)"
  local kids
  mapfile -t kids < <(helper descendants "$$" 2>/dev/null)
  kill_tree "$$" TERM
  wait_gone 20 "${kids[@]}" || true
  exit 143
}
trap on_term TERM INT

# ------------------------------------------------------------------------------------ file:// and gs://
copy_local() {
  local src="$1" out="$2" uri="$3" dest="$RAW_DIR/$2" tmp
  [[ -f "$src" ]] || { warn "$uri: source file not found: $src"; return 1; }
  mkdir -p "$(dirname "$dest")"
  tmp="$(dirname "$dest")/.$(basename "$dest").copy.tmp"
  cp --preserve=timestamps -- "$src" "$tmp"
  sync -- "$tmp" 2>/dev/null || true
  mv -f -- "$tmp" "$dest"
}
copy_gs() {
  local out="$1" uri="$2" dest="$RAW_DIR/$1"
  mkdir -p "$(dirname "$dest")"
  # cloud_sync downloads to a temporary name, verifies the CRC32C and renames.
  retry 3 cloud_sync cp "$uri" "$dest"
}

# -------------------------------------------------------------------------------------------- aria2c
run_aria2c() {
  local input="$1"
  run_logged aria2c \
    --input-file="$input" \
    --dir="$RAW_DIR" \
    --continue=true \
    --always-resume=true \
    --allow-overwrite=false \
    --auto-file-renaming=false \
    --file-allocation=none \
    --auto-save-interval="$TRIPLET_ARIA2_AUTO_SAVE_INTERVAL" \
    --max-concurrent-downloads="$TRIPLET_ARIA2_JOBS" \
    --split="$TRIPLET_ARIA2_SPLIT" \
    --max-connection-per-server="$TRIPLET_ARIA2_SPLIT" \
    --min-split-size=64M \
    --max-tries="$TRIPLET_ARIA2_MAX_TRIES" \
    --retry-wait="$TRIPLET_ARIA2_RETRY_WAIT" \
    --connect-timeout=30 \
    --timeout=60 \
    --remote-time=true \
    --conditional-get=false \
    --check-certificate=true \
    --summary-interval=60 \
    --console-log-level=warn \
    --download-result=hide \
    --show-console-readout=false \
    --enable-color=false
}

downloaded=0 failed=0
round=1 delay="${TRIPLET_RETRY_BASE_S}"
while :; do
  mapfile -t pending < <(pending_outs)
  ((${#pending[@]} == 0)) && break
  declare -a http_outs=()
  for i in "${!OUT[@]}"; do
    out="${OUT[$i]}"
    printf '%s\n' "${pending[@]}" | grep -qxF -- "$out" || continue
    case "${KIND[$i]}" in
      file)
        log "copying ${URI[$i]} -> $out"
        if copy_local "${SRC[$i]}" "$out" "${URI[$i]}" && verify_and_record "$out" "${URI[$i]}"; then
          downloaded=$((downloaded + 1))
        fi
        ;;
      gs)
        log "copying ${URI[$i]} -> $out"
        if copy_gs "$out" "${URI[$i]}" && verify_and_record "$out" "${URI[$i]}"; then
          downloaded=$((downloaded + 1))
        fi
        ;;
      http)
        # A finished file without a record (or a partial one): aria2c resumes it or confirms it is done.
        http_outs+=("$out")
        ;;
    esac
  done
  if ((${#http_outs[@]})); then
    input="$STATE/aria2-input.txt"
    helper aria2-input "$MANIFEST" "$input" "${http_outs[@]}" --repo-root "$TRIPLET_REPO_DIR"
    log "aria2c: ${#http_outs[@]} entries (round ${round}/${TRIPLET_DOWNLOAD_ROUNDS})"
    rc=0
    run_aria2c "$input" || rc=$?
    ((rc == 0)) || warn "aria2c exited with ${rc}"
    for out in "${http_outs[@]}"; do
      for i in "${!OUT[@]}"; do
        [[ "${OUT[$i]}" == "$out" ]] || continue
        if verify_and_record "$out" "${URI[$i]}"; then
          downloaded=$((downloaded + 1))
        elif [[ -f "$RAW_DIR/$out" && ! -e "$RAW_DIR/$out.aria2" && "$out" == *.tar ]]; then
          # aria2c says finished but the tar is incomplete: keep it aside, fetch it afresh next round.
          warn "$out: finished by aria2c but not a complete tar; moved to $out.corrupt"
          mv -f -- "$RAW_DIR/$out" "$RAW_DIR/$out.corrupt"
        fi
      done
    done
  fi
  ((round >= TRIPLET_DOWNLOAD_ROUNDS)) && break
  mapfile -t still < <(pending_outs)
  ((${#still[@]} == 0)) && break
  warn "${#still[@]} entries not complete after round ${round}; next round in ${delay}s"
  sleep "$delay"
  round=$((round + 1))
  delay=$((delay * 2))
  ((delay > TRIPLET_RETRY_MAX_S)) && delay="${TRIPLET_RETRY_MAX_S}"
done

# ------------------------------------------------------------------------------------------- summary
mapfile -t missing < <(pending_outs)
failed=${#missing[@]}
missing_uris=()
for out in "${missing[@]}"; do
  for i in "${!OUT[@]}"; do
    [[ "${OUT[$i]}" == "$out" ]] && missing_uris+=("${URI[$i]}")
  done
done
bytes="$(du -sb --exclude=.triplet-downloads "$RAW_DIR" 2>/dev/null | cut -f1)"
log "download summary: entries=${n_entries} already_complete=${n_complete_before} downloaded=${downloaded} failed=${failed} bytes_on_disk=${bytes:-0}"
if [[ -n "$SUMMARY_JSON" ]]; then
  rm -f "$SUMMARY_JSON"
  missing_json="$(printf '%s\n' "${missing_uris[@]}" | "$TRIPLET_SYS_PYTHON" -c 'import json,sys; print(json.dumps([l for l in sys.stdin.read().splitlines() if l]))')"
  marker_update "$SUMMARY_JSON" entries:="$n_entries" already_complete:="$n_complete_before" \
    downloaded:="$downloaded" failed:="$failed" bytes_on_disk:="${bytes:-0}" missing:="$missing_json"
fi
if ((failed > 0)); then
  for u in "${missing_uris[@]}"; do log "missing: $u"; done
  die "download failed: ${failed} of ${n_entries} entries missing: ${missing_uris[*]}"
fi
log "all ${n_entries} entries downloaded and verified in $RAW_DIR"
