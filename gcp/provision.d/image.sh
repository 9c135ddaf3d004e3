# shellcheck shell=bash
# `provision.sh image`: bakes BAKED_IMAGE_FAMILY, the boot image that USE_BAKED_IMAGE=true gives the template
# and the Batch jobs. Sourced by gcp/provision.sh, never run.
#
# A managed group repairs a preempted VM by RECREATING it: a new boot disk from the image, so whatever the
# startup script's `system` step installed (Debian's NVIDIA driver built by DKMS, aria2, git, uv) is installed
# again at every recreation, 10 minutes or more before the first batch. The baked image holds all of it: the
# step then finds everything in place and the VM reaches its first batch within minutes. The driver's packages
# and the kernel's are held in it (apt-mark hold, system.sh): every VM of the run has the same driver, and
# unattended upgrades cannot swap its libraries under a running job; a new driver is a new image (--rebuild).
# The bake refuses to power off into an image whose GPU stack is incomplete (system.sh step_bake).
#
# The builder: the template's machine and GPU (the driver builds and loads against the real device), STANDARD
# provisioning (a preemption must not cut the bake short; automatic restart brings it back after a host
# event and the startup script carries on), the public IMAGE_FAMILY, the startup script, and triplet-bake=true:
# its boot runs the `system` step and powers the VM off. Its boot disk then becomes the family's next image.
BAKE_METADATA_KEY=triplet-bake

builder_args() {
	machine_args "${CFG[IMAGE_FAMILY]}" "${CFG[IMAGE_PROJECT]}"
	BUILDER_ARGS=(
		"${PZ[@]}"
		--provisioning-model=STANDARD
		--restart-on-failure
		"${MACHINE_ARGS[@]}"
		--metadata="startup-script-url=$STARTUP_URI/startup_preprocess.sh,enable-oslogin=TRUE,$BAKE_METADATA_KEY=true,triplet-repo-url=${CFG[REPO_URL]},triplet-repo-ref=${CFG[REPO_REF]}"
		--labels="$LABELS,role=image-builder"
	)
}

builder_status() { # var -> 0 when the image builder exists; its status in var
	gc_look "$1" compute instances describe "$BUILDER_NAME" "${PZ[@]}" --format='value(status)'
}

# Polls the builder until it is TERMINATED (it powers itself off when the bake is done), at most
# BAKE_TIMEOUT_MIN minutes, every PROVISION_POLL_S seconds.
wait_for_builder() {
	local status="" poll=${PROVISION_POLL_S:-30} deadline=$((SECONDS + CFG[BAKE_TIMEOUT_MIN] * 60))
	[[ $poll =~ ^[0-9]{1,4}$ ]] || die "PROVISION_POLL_S must be a number of seconds"
	if ((DRY_RUN)); then
		builder_status status || true
		note "repeated every ${poll}s until the builder is TERMINATED (at most BAKE_TIMEOUT_MIN=${CFG[BAKE_TIMEOUT_MIN]} minutes)"
		return 0
	fi
	while :; do
		builder_status status || die "the image builder $BUILDER_NAME disappeared while baking"
		[[ $status == TERMINATED ]] && return 0
		((SECONDS < deadline)) ||
			die "the image builder $BUILDER_NAME is still $status after ${CFG[BAKE_TIMEOUT_MIN]} minutes (BAKE_TIMEOUT_MIN): read its serial console (gcloud compute instances get-serial-port-output $BUILDER_NAME --zone=$ZONE --project=$PROJECT), then run 'provision.sh image' again (it waits for the same builder) or delete the builder"
		log "image builder $BUILDER_NAME is $status; next look in ${poll}s"
		sleep "$poll"
	done
}

do_image() {
	step "image"
	local found="" status="" family=${CFG[BAKED_IMAGE_FAMILY]}
	((DRY_RUN)) || [[ ${CFG[USE_BAKED_IMAGE]} == true ]] ||
		note "USE_BAKED_IMAGE=false: the template and Batch keep ${CFG[IMAGE_FAMILY]} until it is true"
	if gc_look found compute images describe-from-family "$family" "${P[@]}" --format='value(name)' && ((!REBUILD)); then
		note "image family $family has ${found:-an image}; --rebuild bakes a new one"
		# A builder that an interrupted run left behind after its image was made.
		if builder_status status; then
			if [[ $status == TERMINATED ]]; then
				gc_run compute instances delete "$BUILDER_NAME" "${PZ[@]}" --quiet
			else
				note "the image builder $BUILDER_NAME is $status (another bake under way?): left alone"
			fi
		fi
		return 0
	fi
	if builder_status status; then
		note "the image builder $BUILDER_NAME exists ($status): baking from it"
	else
		builder_args
		gc_run_retrying compute instances create "$BUILDER_NAME" "${BUILDER_ARGS[@]}"
	fi
	wait_for_builder
	local image
	image="$family-$(date -u +%Y%m%d-%H%M%S)"
	# A rebuild within the same second as the family's newest image (possible only when nothing is baked,
	# as against the stand-in) would reuse its name: the next second's name is free.
	while [[ $image == "${found:-}" ]]; do
		sleep 1
		image="$family-$(date -u +%Y%m%d-%H%M%S)"
	done
	gc_run compute images create "$image" "${P[@]}" --source-disk="$BUILDER_NAME" --source-disk-zone="$ZONE" \
		--family="$family" --storage-location="$REGION" --labels="$LABELS" \
		--description="${CFG[IMAGE_PROJECT]}/${CFG[IMAGE_FAMILY]} with Debian's NVIDIA driver (held), aria2, git and uv (gcp/provision.sh image)"
	gc_run compute instances delete "$BUILDER_NAME" "${PZ[@]}" --quiet
}
