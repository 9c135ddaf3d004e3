# shellcheck shell=bash
# `provision.sh buckets` and `provision.sh upload-scripts`: the raw and processed buckets, and the few objects
# the VMs fetch from the processed one before they have a checkout. Who may do what in the buckets is
# gcp/provision.d/service_account.sh. Sourced by gcp/provision.sh, never run.

# shellcheck disable=SC2153 # LABELS: set by cfg_derive (gcp/provision.d/config.sh), not a misspelt labels
ensure_bucket() { # bucket lifecycle-file versioning(true|false)
	local bucket=$1 lifecycle rules versioning=$3 fp labels=""
	lifecycle=$(repo_path "$2")
	rules=$(cat "$lifecycle") || die "lifecycle file not found: $lifecycle"
	# The label records which rules and versioning setting the bucket has: a changed file is applied again.
	fp=$(fingerprint "$rules versioning=$versioning")
	if ! gc_look labels storage buckets describe "gs://$bucket" "${P[@]}" --format='value(labels.triplet_lifecycle)'; then
		gc_run storage buckets create "gs://$bucket" "${P[@]}" --location="${CFG[BUCKET_LOCATION]}" \
			--default-storage-class=STANDARD --uniform-bucket-level-access --public-access-prevention
	fi
	if [[ $labels != "$fp" ]]; then
		local vflag=--no-versioning
		[[ $versioning == true ]] && vflag=--versioning
		gc_run storage buckets update "gs://$bucket" "${P[@]}" --lifecycle-file="$lifecycle" "$vflag" \
			--update-labels="$LABELS,triplet_lifecycle=$fp"
	fi
}

do_buckets() {
	step "buckets"
	ensure_bucket "${CFG[RAW_BUCKET]}" "${CFG[RAW_LIFECYCLE_FILE]}" false
	ensure_bucket "${CFG[PROCESSED_BUCKET]}" "${CFG[PROCESSED_LIFECYCLE_FILE]}" "${CFG[PROCESSED_VERSIONING]}"
}

# The guest agent runs startup_preprocess.sh alone (startup-script-url); its stage 0 clones REPO_URL at REPO_REF
# and continues from the checkout, where every other script lives. So the bucket holds only the two scripts
# the metadata names, the Ops Agent config and the manifest.
BUCKET_SCRIPTS=(startup_preprocess.sh shutdown_preprocess.sh)

do_upload_scripts() {
	step "upload-scripts"
	local dir f
	dir=$(repo_path "${CFG[SCRIPTS_DIR]}")
	for f in "${BUCKET_SCRIPTS[@]}"; do
		if [[ ! -f $dir/$f ]]; then
			((DRY_RUN)) || die "$dir/$f is missing (see docs/bootstrap.md)"
			note "warning: $dir/$f does not exist"
		fi
		upload_if_changed "$dir/$f" "$STARTUP_URI/$f"
	done
	upload_if_changed "$(repo_path "${CFG[OPS_AGENT_CONFIG_FILE]}")" "$STARTUP_URI/ops-agent-config.yaml"
	if [[ -n ${CFG[MANIFEST_SOURCE]} ]]; then
		local manifest
		manifest=$(repo_path "${CFG[MANIFEST_SOURCE]}")
		if [[ -f $manifest ]] || ((DRY_RUN)); then
			upload_if_changed "$manifest" "${CFG[MANIFEST_URI]}"
		else
			die "MANIFEST_SOURCE $manifest does not exist"
		fi
	fi
}
