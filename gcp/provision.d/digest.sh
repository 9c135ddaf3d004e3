# shellcheck shell=bash
# Content digests, where a rerun must change nothing and the resource's mere existence does not tell: an
# upload is skipped when the object already holds the file's MD5, and a fingerprint of the settings names
# the immutable instance template and labels a bucket with the rules it has. Sourced by
# gcp/provision_common.sh, never run.

# The file's MD5 in hex, as `gcloud storage hash --hex` prints an object's, with whichever tool is here.
local_md5() {
	local sum
	if command -v md5sum >/dev/null 2>&1; then
		sum=$(md5sum <"$1")
		printf '%s' "${sum%% *}"
	elif command -v md5 >/dev/null 2>&1; then
		md5 -q "$1"
	else
		"$GCLOUD_BIN" storage hash "$1" --hex --skip-crc32c --format='value(md5_hash)'
	fi
}

# Uploads a local file unless the object already holds the same bytes, so a second run sends nothing.
upload_if_changed() { # local-file destination-uri
	local src=$1 dst=$2 remote=""
	if ((DRY_RUN)); then
		gc_look remote storage hash "$dst" --hex --skip-crc32c --format='value(md5_hash)' || true
		gc_run storage cp "$src" "$dst"
		return 0
	fi
	[[ -f $src ]] || die "missing file to upload: $src"
	if gc_look remote storage hash "$dst" --hex --skip-crc32c --format='value(md5_hash)' &&
		[[ $remote == "$(local_md5 "$src")" ]]; then
		return 0
	fi
	gc_run storage cp "$src" "$dst"
}

# Fingerprint of text (sha256, 12 hex digits): names the immutable instance template and labels buckets.
fingerprint() {
	local sum
	if command -v sha256sum >/dev/null 2>&1; then
		sum=$(printf '%s' "$1" | sha256sum)
	else
		sum=$(printf '%s' "$1" | shasum -a 256)
	fi
	printf '%s' "${sum:0:12}"
}

file_fingerprint() {
	[[ -f $1 ]] || die "file not found: $1"
	fingerprint "$(cat "$1")"
}
