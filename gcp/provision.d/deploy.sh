# shellcheck shell=bash
# `provision.sh template`, `mig` and `vm`: the instance template every preprocessing VM is made from, and the
# managed group of size 1 (DEPLOY_MODE=mig) or single VM (DEPLOY_MODE=vm) made from it. The machine itself
# (type, GPU, boot disk, account, network) is also what the image builder of gcp/provision.d/image.sh runs on.
# Sourced by gcp/provision.sh, never run.

MACHINE_ARGS=()

# The template's machine, which the image builder shares: the driver is baked on the GPU it will run on.
machine_args() { # image-family image-project -> MACHINE_ARGS
	MACHINE_ARGS=(
		--machine-type="${CFG[MACHINE_TYPE]}"
		--accelerator="type=${CFG[ACCELERATOR_TYPE]},count=${CFG[ACCELERATOR_COUNT]}"
		--maintenance-policy=TERMINATE
		--image-family="$1"
		--image-project="$2"
		--boot-disk-size="${CFG[BOOT_DISK_GB]}GB"
		--boot-disk-type="${CFG[BOOT_DISK_TYPE]}"
		# Secure boot off: Debian's NVIDIA module is built by DKMS and not signed.
		--no-shielded-secure-boot
		--shielded-vtpm
		--shielded-integrity-monitoring
		--service-account="$SA_EMAIL"
		--scopes=cloud-platform
		--network="${CFG[NETWORK]}"
	)
	if [[ -n ${CFG[SUBNET]} ]]; then
		MACHINE_ARGS+=(--subnet="projects/$PROJECT/regions/$REGION/subnetworks/${CFG[SUBNET]}")
	fi
}

TEMPLATE_ARGS=()
TEMPLATE_NAME=""

upper_bool() { if [[ $1 == true ]]; then printf TRUE; else printf FALSE; fi; }

build_template() {
	local preprocess_cfg cfg_fp
	preprocess_cfg=$(repo_path "${CFG[PREPROCESS_CONFIG]}")
	if [[ -f $preprocess_cfg ]]; then
		cfg_fp=$(file_fingerprint "$preprocess_cfg")
	else
		((DRY_RUN)) || die "PREPROCESS_CONFIG $preprocess_cfg does not exist"
		cfg_fp=missing
	fi
	local metadata=(
		"startup-script-url=$STARTUP_URI/startup_preprocess.sh"
		"shutdown-script-url=$STARTUP_URI/shutdown_preprocess.sh"
		"enable-oslogin=TRUE"
		"triplet-run-id=${CFG[RUN_ID]}"
		"triplet-checkpoint-uri=$CKPT_URI"
		"triplet-manifest-uri=${CFG[MANIFEST_URI]}"
		"triplet-repo-url=${CFG[REPO_URL]}"
		"triplet-repo-ref=${CFG[REPO_REF]}"
		"triplet-on-done=${CFG[ON_DONE]}"
		"triplet-push-interval-min=${CFG[PUSH_INTERVAL_MIN]}"
		"triplet-install-ops-agent=$(upper_bool "${CFG[INSTALL_OPS_AGENT]}")"
		"triplet-deploy-mode=${CFG[DEPLOY_MODE]}"
	)
	local joined
	joined=$(
		IFS=,
		printf '%s' "${metadata[*]}"
	)
	TEMPLATE_ARGS=(
		--project="$PROJECT"
		--provisioning-model="${CFG[PROVISIONING_MODEL]}"
	)
	if [[ ${CFG[PROVISIONING_MODEL]} == SPOT ]]; then
		# Spot: explicit termination action; never --restart-on-failure (the API refuses it with Spot).
		TEMPLATE_ARGS+=(--instance-termination-action="${CFG[TERMINATION_ACTION]}")
	else
		TEMPLATE_ARGS+=(--restart-on-failure)
	fi
	boot_image
	machine_args "$BOOT_IMAGE_FAMILY" "$BOOT_IMAGE_PROJECT"
	TEMPLATE_ARGS+=(
		"${MACHINE_ARGS[@]}"
		--disk="name=${CFG[RAW_DISK]},device-name=${CFG[RAW_DISK]},mode=rw,boot=no,auto-delete=no"
		--disk="name=${CFG[WORK_DISK]},device-name=${CFG[WORK_DISK]},mode=rw,boot=no,auto-delete=no"
		--metadata="$joined"
		--metadata-from-file="triplet-preprocess-config=$preprocess_cfg"
		--labels="$LABELS,run=${CFG[RUN_ID]}"
	)
	# The fingerprint covers every setting and the preprocess YAML's content (not its local path).
	local fp_args=("${TEMPLATE_ARGS[@]}")
	fp_args[${#fp_args[@]} - 2]="--metadata-from-file=triplet-preprocess-config=sha:$cfg_fp"
	TEMPLATE_NAME="${CFG[TEMPLATE_PREFIX]}-$(fingerprint "${fp_args[*]}")"
}

do_template() {
	step "template"
	build_template
	local out=""
	if gc_look out compute instance-templates describe "$TEMPLATE_NAME" "${P[@]}" --format='value(name)'; then
		note "template $TEMPLATE_NAME exists (same settings)"
		return 0
	fi
	gc_run_retrying compute instance-templates create "$TEMPLATE_NAME" "${TEMPLATE_ARGS[@]}"
}

# --- mig / vm ----------------------------------------------------------------------------------------------
do_mig() {
	step "mig"
	[[ -n $TEMPLATE_NAME ]] || build_template
	local current="" out=""
	if gc_look current compute instance-groups managed describe "${CFG[MIG_NAME]}" "${PZ[@]}" \
		--format='value(instanceTemplate.basename())'; then
		if [[ $current != "$TEMPLATE_NAME" ]]; then
			gc_run compute instance-groups managed set-instance-template "${CFG[MIG_NAME]}" "${PZ[@]}" \
				--template="$TEMPLATE_NAME"
			((APPLY_NOW)) || note "the group uses $TEMPLATE_NAME from its next VM recreation; --apply-now replaces the VM now"
		fi
		if ((APPLY_NOW)); then
			gc_run compute instance-groups managed update-instances "${CFG[MIG_NAME]}" "${PZ[@]}" \
				--all-instances --minimal-action=replace
		fi
		return 0
	fi
	if gc_look out compute instances describe "${CFG[VM_NAME]}" "${PZ[@]}" --format='value(status)'; then
		die "a single VM ${CFG[VM_NAME]} uses the disks: remove it first (provision.sh teardown)"
	fi
	# Zonal group (--zone), size 1; both data disks stateful and never deleted with the VM. Opportunistic
	# updates: a new template never restarts a running VM by surprise.
	gc_run compute instance-groups managed create "${CFG[MIG_NAME]}" "${PZ[@]}" \
		--template="$TEMPLATE_NAME" --size=1 --base-instance-name="${CFG[VM_NAME]}" \
		--stateful-disk="device-name=${CFG[RAW_DISK]},auto-delete=never" \
		--stateful-disk="device-name=${CFG[WORK_DISK]},auto-delete=never" \
		--update-policy-type=opportunistic --default-action-on-vm-failure=repair
}

do_vm() {
	step "vm"
	[[ -n $TEMPLATE_NAME ]] || build_template
	# shellcheck disable=SC2034 # out: what the look found, unused: only whether it exists counts here
	local status="" out=""
	if gc_look status compute instances describe "${CFG[VM_NAME]}" "${PZ[@]}" --format='value(status)'; then
		if [[ $status == TERMINATED ]]; then
			gc_run compute instances start "${CFG[VM_NAME]}" "${PZ[@]}"
		else
			note "VM ${CFG[VM_NAME]} exists ($status)"
		fi
		return 0
	fi
	if gc_look out compute instance-groups managed describe "${CFG[MIG_NAME]}" "${PZ[@]}" --format='value(name)'; then
		die "the group ${CFG[MIG_NAME]} uses the disks: remove it first (provision.sh teardown)"
	fi
	gc_run compute instances create "${CFG[VM_NAME]}" "${PZ[@]}" --source-instance-template="$TEMPLATE_NAME"
}
