#!/usr/bin/env bash
# Download the archives of an aria2c manifest into a folder, resumably.
#
#   download_archives.sh --manifest PATH|gs://URI --dir RAW_DIR [--summary-json FILE] [--verify-only]
#
# The manifest is aria2c's input format, read strictly (building_image_triplet_model/inputs/manifest.py: only
# out= and checksum= options, since aria2c options can run commands). A gs:// manifest is fetched once into
# RAW_DIR/.triplet-downloads/manifests/.
#
# Every file is downloaded into RAW_DIR/.triplet-downloads/partial/<out> and moved to RAW_DIR/<out> only
# when it is complete: aria2c has finished it (no .aria2 control file left) and, for a .tar, the strict tar
# reader read it to its end-of-archive marker. So RAW_DIR/<out> is always a whole file, and the engine may
# read each archive the moment it appears (it does, while later ones still download: `--follow`).
# - http(s) entries: aria2c with resume-friendly options (continue, no preallocation, the control file
#   saved every TRIPLET_ARIA2_AUTO_SAVE_INTERVAL s so that even a SIGKILL loses at most that much, retries,
#   parallel downloads); rounds are retried with backoff; partial files stay for the next attempt.
# - file:// entries (absolute, or relative to the repository) and gs:// entries are copied without aria2c.
#
# Exit: 0 all complete; 1 something is missing (the missing URLs are listed); 2 usage or bad manifest.
# Env: TRIPLET_ARIA2_JOBS (6), TRIPLET_ARIA2_SPLIT (1), TRIPLET_ARIA2_MAX_TRIES (10), TRIPLET_ARIA2_RETRY_WAIT
# (10), TRIPLET_ARIA2_AUTO_SAVE_INTERVAL (1), TRIPLET_DOWNLOAD_ROUNDS (3), TRIPLET_REPO_DIR, TRIPLET_PYTHON.
set -Eeuo pipefail
# shellcheck source=gcp/scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${TRIPLET_ARIA2_JOBS:=6}"
: "${TRIPLET_ARIA2_SPLIT:=1}"
: "${TRIPLET_ARIA2_MAX_TRIES:=10}"
: "${TRIPLET_ARIA2_RETRY_WAIT:=10}"
: "${TRIPLET_ARIA2_AUTO_SAVE_INTERVAL:=1}"
: "${TRIPLET_DOWNLOAD_ROUNDS:=3}"
: "${TRIPLET_REPO_DIR:=$TRIPLET_SCRIPTS_REPO}"

usage() { sed -n '2,/^set -Eeuo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

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
mkdir -p "$STATE/partial"

if [[ "$MANIFEST" == gs://* ]]; then
  local_manifest="$STATE/manifests/$(basename "$MANIFEST")"
  if [[ ! -s "$local_manifest" ]]; then
    mkdir -p "$STATE/manifests"
    log "fetching manifest $MANIFEST"
    retry 4 vm remote.cloud_sync cp "$MANIFEST" "$local_manifest" || die "cannot fetch the manifest $MANIFEST"
  fi
  MANIFEST="$local_manifest"
elif [[ "$MANIFEST" != /* && ! -f "$MANIFEST" && -f "$TRIPLET_REPO_DIR/$MANIFEST" ]]; then
  MANIFEST="$TRIPLET_REPO_DIR/$MANIFEST"
fi
[[ -f "$MANIFEST" ]] || TRIPLET_DIE_CODE=2 die "manifest not found: $MANIFEST"

status_table() { vm vm.downloads status "$MANIFEST" "$RAW_DIR" --repo-root "$TRIPLET_REPO_DIR"; }
table="$(status_table)" || TRIPLET_DIE_CODE=2 die "bad manifest $MANIFEST (see above)"
declare -a KIND=() URI=() OUT=() SRC=()
n_complete_before=0
while IFS=$'\t' read -r st kind uri out src _why; do
  [[ -n "$kind" ]] || continue
  KIND+=("$kind") URI+=("$uri") OUT+=("$out") SRC+=("$src")
  [[ "$st" == complete ]] && n_complete_before=$((n_complete_before + 1))
done <<<"$table"
n_entries=${#OUT[@]}
log "manifest $MANIFEST: ${n_entries} entries, ${n_complete_before} already complete in $RAW_DIR"
pending_outs() { status_table | awk -F'\t' '$1 == "pending" { print $4 }'; }

if ((VERIFY_ONLY)); then
  missing="$(pending_outs)"
  [[ -z "$missing" ]] || { log "verify: not complete: $(tr '\n' ' ' <<<"$missing")"; exit 1; }
  log "verify: all ${n_entries} entries complete"
  exit 0
fi

on_term() {
  trap '' TERM INT
  log "SIGTERM: stopping downloads (partial files and aria2c control files are kept)"
  local kids
  mapfile -t kids < <(pgrep -P "$$" 2>/dev/null || true)
  kill_tree "$$" TERM
  wait_gone 20 "${kids[@]}" || true
  exit 143
}
trap on_term TERM INT

# commit OUT URI: move the finished staged file into place (verified); a truncated tar is set aside and
# fetched afresh next round. (aria2_done.sh already committed what aria2c finished while it ran.)
commit() {
  local why
  [[ -f "$STATE/partial/$1" ]] || return 0
  if why="$(vm vm.downloads commit "$RAW_DIR" "$1" "$2" 2>&1)"; then
    log "complete: $1"
    return 0
  fi
  local part="$STATE/partial/$1"
  if [[ -f "$part" && ! -e "$part.aria2" && "$why" == *"not a complete tar"* ]]; then
    warn "$why; moved to $part.corrupt"
    mv -f -- "$part" "$part.corrupt"
  fi
  return 1
}

copy_file() { # SRC OUT: a local file into the staging folder (through a temporary name)
  local dest="$STATE/partial/$2"
  [[ -f "$1" ]] || { warn "source file not found: $1"; return 1; }
  mkdir -p "$(dirname "$dest")"
  cp --preserve=timestamps -- "$1" "$dest.copy.tmp"
  sync -- "$dest.copy.tmp" 2>/dev/null || true
  mv -f -- "$dest.copy.tmp" "$dest"
}

run_aria2c() {
  run_logged aria2c --input-file="$1" --dir="$RAW_DIR" --continue=true --always-resume=true \
    --allow-overwrite=false --auto-file-renaming=false --file-allocation=none \
    --auto-save-interval="$TRIPLET_ARIA2_AUTO_SAVE_INTERVAL" --max-concurrent-downloads="$TRIPLET_ARIA2_JOBS" \
    --split="$TRIPLET_ARIA2_SPLIT" --max-connection-per-server="$TRIPLET_ARIA2_SPLIT" --min-split-size=64M \
    --max-tries="$TRIPLET_ARIA2_MAX_TRIES" --retry-wait="$TRIPLET_ARIA2_RETRY_WAIT" --connect-timeout=30 \
    --timeout=60 --remote-time=true --conditional-get=false --check-certificate=true --summary-interval=0 \
    --console-log-level=warn --download-result=hide --show-console-readout=false --enable-color=false \
    --on-download-complete="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/aria2_done.sh"
}
export TRIPLET_DL_RAW_DIR="$RAW_DIR"

round=1 delay="${TRIPLET_RETRY_BASE_S}"
while :; do
  mapfile -t pending < <(pending_outs)
  ((${#pending[@]} == 0)) && break
  declare -a http_outs=() http_uris=()
  for i in "${!OUT[@]}"; do
    printf '%s\n' "${pending[@]}" | grep -qxF -- "${OUT[$i]}" || continue
    case "${KIND[$i]}" in
      file) copy_file "${SRC[$i]}" "${OUT[$i]}" && commit "${OUT[$i]}" "${URI[$i]}" || true ;;
      gs) retry 3 vm remote.cloud_sync cp "${URI[$i]}" "$STATE/partial/${OUT[$i]}" && commit "${OUT[$i]}" "${URI[$i]}" || true ;;
      http) http_outs+=("${OUT[$i]}") http_uris+=("${URI[$i]}") ;;
    esac
  done
  if ((${#http_outs[@]})); then
    vm vm.downloads aria2-input "$MANIFEST" "$STATE/aria2-input.txt" "${http_outs[@]}" --repo-root "$TRIPLET_REPO_DIR"
    log "aria2c: ${#http_outs[@]} entries (round ${round}/${TRIPLET_DOWNLOAD_ROUNDS})"
    rc=0
    run_aria2c "$STATE/aria2-input.txt" || rc=$?
    ((rc == 0)) || warn "aria2c exited with ${rc}"
    for j in "${!http_outs[@]}"; do commit "${http_outs[$j]}" "${http_uris[$j]}" || true; done
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

mapfile -t missing < <(pending_outs)
missing_uris=()
for out in "${missing[@]}"; do
  for i in "${!OUT[@]}"; do [[ "${OUT[$i]}" == "$out" ]] && missing_uris+=("${URI[$i]}"); done
done
failed=${#missing[@]}
downloaded=$((n_entries - failed - n_complete_before))
log "download summary: entries=${n_entries} already_complete=${n_complete_before} downloaded=${downloaded} failed=${failed}"
if [[ -n "$SUMMARY_JSON" ]]; then
  vm vm.downloads summary "$MANIFEST" "$RAW_DIR" "$SUMMARY_JSON" --repo-root "$TRIPLET_REPO_DIR" \
    --before "$n_complete_before" --downloaded "$downloaded"
fi
if ((failed > 0)); then
  for u in "${missing_uris[@]}"; do log "missing: $u"; done
  die "download failed: ${failed} of ${n_entries} entries missing: ${missing_uris[*]}"
fi
log "all ${n_entries} entries downloaded and verified in $RAW_DIR"
