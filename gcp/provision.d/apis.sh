# shellcheck shell=bash
# `provision.sh apis`: the APIs the rest of gcp/provision.sh needs before it can look at anything, and the
# project's default region and zone, so that an operator's own gcloud commands land where the resources are.
# Sourced by gcp/provision.sh, never run.

REQUIRED_APIS=(compute.googleapis.com storage.googleapis.com logging.googleapis.com monitoring.googleapis.com
	iam.googleapis.com cloudresourcemanager.googleapis.com)

do_apis() {
	step "apis"
	enable_apis "${REQUIRED_APIS[@]}"

	local meta=""
	gc_look meta compute project-info describe "${P[@]}" --flatten='commonInstanceMetadata.items[]' \
		--format='value(commonInstanceMetadata.items.key,commonInstanceMetadata.items.value)' || true
	if ! has_row "$meta" "google-compute-default-region"$'\t'"$REGION" ||
		! has_row "$meta" "google-compute-default-zone"$'\t'"$ZONE"; then
		gc_run compute project-info add-metadata "${P[@]}" \
			--metadata="google-compute-default-region=$REGION,google-compute-default-zone=$ZONE"
	fi
}
