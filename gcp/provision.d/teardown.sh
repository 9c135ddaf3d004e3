# shellcheck shell=bash
# `provision.sh teardown`: deletes what costs money while nothing runs (the group, the VM, a leftover image
# builder, the templates); the data (checkpoints, disks, images, buckets, the account) only with its own flag.
# Sourced by gcp/provision.sh, never run.

do_teardown() {
	step "teardown"
	# shellcheck disable=SC2034 # out: what the look found, unused: only whether it exists counts here
	local out=""
	if gc_probe out compute instance-groups managed describe "${CFG[MIG_NAME]}" "${PZ[@]}" --format='value(name)'; then
		gc_run compute instance-groups managed delete "${CFG[MIG_NAME]}" "${PZ[@]}" --quiet
	fi
	if gc_probe out compute instances describe "${CFG[VM_NAME]}" "${PZ[@]}" --format='value(name)'; then
		# --keep-disks=data: belt and braces, the data disks have auto-delete off anyway.
		gc_run compute instances delete "${CFG[VM_NAME]}" "${PZ[@]}" --keep-disks=data --quiet
	fi
	if gc_probe out compute instances describe "$BUILDER_NAME" "${PZ[@]}" --format='value(name)'; then
		gc_run compute instances delete "$BUILDER_NAME" "${PZ[@]}" --quiet
	fi
	local templates=() listing="" name
	gc_probe listing compute instance-templates list "${P[@]}" --filter="name~^${CFG[TEMPLATE_PREFIX]}-" \
		--format='value(name)' || true
	while IFS= read -r name; do [[ -n $name ]] && templates+=("$name"); done <<<"$listing"
	if ((DRY_RUN)); then
		build_template
		templates=("$TEMPLATE_NAME")
	fi
	for name in "${templates[@]}"; do
		gc_run compute instance-templates delete "$name" "${P[@]}" --quiet
	done

	if ((DELETE_CHECKPOINTS)); then
		if gc_probe out storage ls "$RUN_CKPT_URI/"; then
			gc_run storage rm --recursive --all-versions "$RUN_CKPT_URI/"
		fi
	fi
	if ((DELETE_DISKS)); then
		local disk
		for disk in "${CFG[RAW_DISK]}" "${CFG[WORK_DISK]}"; do
			if gc_probe out compute disks describe "$disk" "${PZ[@]}" --format='value(name)'; then
				gc_run compute disks delete "$disk" "${PZ[@]}" --quiet
			fi
		done
	else
		note "disks kept (--delete-disks deletes them)"
	fi
	if ((DELETE_IMAGES)); then
		local images=()
		gc_probe listing compute images list "${P[@]}" --no-standard-images \
			--filter="family=${CFG[BAKED_IMAGE_FAMILY]}" --format='value(name)' || true
		while IFS= read -r name; do [[ -n $name ]] && images+=("$name"); done <<<"$listing"
		((DRY_RUN)) && images=("${CFG[BAKED_IMAGE_FAMILY]}-20260101-000000")
		for name in "${images[@]}"; do
			gc_run compute images delete "$name" "${P[@]}" --quiet
		done
	fi
	if ((DELETE_SA)); then teardown_service_account; fi
	if ((DELETE_BUCKETS)); then
		local bucket
		for bucket in "${CFG[RAW_BUCKET]}" "${CFG[PROCESSED_BUCKET]}"; do
			if gc_probe out storage buckets describe "gs://$bucket" "${P[@]}" --format='value(name)'; then
				gc_run storage rm --recursive --all-versions "gs://$bucket"
			fi
		done
	else
		note "buckets kept (--delete-buckets deletes them and everything in them)"
	fi
}
