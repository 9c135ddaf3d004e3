#!/usr/bin/env bash
# Creates everything the preprocessing run needs in a Google Cloud project, from nothing, idempotently:
# every step looks (describe/list) before it creates, so running it again changes nothing.
#
#   gcp/provision.sh [--dry-run] [--config FILE] [--set KEY=VALUE]... SUBCOMMAND [options]
#
# Subcommands (in the order `all` runs them):
#   apis              enable the APIs; set the project's default region and zone
#   buckets           the raw and processed buckets (uniform access, lifecycle rules, versioning)
#   service-account   the VM's service account and its least-privilege bindings (no key file)
#   disks             the two data disks in ZONE
#   upload-scripts    the startup/shutdown scripts, the Ops Agent config and the manifest, to the bucket
#   template          the instance template (immutable: its name carries a fingerprint of its settings)
#   mig               the managed instance group of size 1 (stateful disks)    [DEPLOY_MODE=mig]
#     --apply-now       replace the group's VM now when the template changed (default: at next recreation)
#   vm                a single VM from the template (alternative to mig)        [DEPLOY_MODE=vm]
#   all               apis buckets service-account disks upload-scripts template, then mig or vm
#   status            VM state, phase markers from the bucket, preemptions so far
#   teardown          delete the group, the VM and the templates; data only with explicit flags:
#     --delete-checkpoints       the run's checkpoints (CHECKPOINT_URI/RUN_ID/, all versions)
#     --delete-disks             the two data disks
#     --delete-buckets           both buckets and everything in them
#     --delete-service-account   the service account, its bindings and the self-stop role
#   move-zone ZONE    snapshot the data disks and recreate them in ZONE (no VM may use them)
#     --delete-old               then delete the disks in the old zone and the snapshots
#
# Options:
#   --dry-run        print the exact gcloud commands instead of running them. Read-only checks are printed as
#                    '# look: gcloud ...' lines and treated as "not found", so a dry run shows what a first run
#                    in an empty project does. Nothing is contacted.
#   --config FILE    the settings file (default: gcp/provision.conf next to this script)
#   --set KEY=VALUE  override one setting (repeatable); checked like the file's values
# Environment: PROVISION_DRY_RUN_LOOK=exists:TEXT makes a dry run assume that every look finds something (and
# prints TEXT): a preview of a rerun, and how the tests reach every command. GCLOUD_BIN: the gcloud to run.
#
# Settings: gcp/provision.conf (read line by line, never sourced). Guide: docs/preprocessing_gcp.md.
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=gcp/provision_common.sh
source "$SCRIPT_DIR/provision_common.sh"

trap 'log "ERROR: failed at line $LINENO: $BASH_COMMAND"' ERR

usage() { sed -n '2,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

CONFIG_FILE=$SCRIPT_DIR/provision.conf
SETS=()
SUBCOMMAND=""
POSITIONAL=()
APPLY_NOW=0
DELETE_CHECKPOINTS=0
DELETE_DISKS=0
DELETE_BUCKETS=0
DELETE_SA=0
DELETE_OLD=0

while (($#)); do
	case $1 in
	--dry-run) DRY_RUN=1 ;;
	--config)
		(($# >= 2)) || die "--config needs a file"
		CONFIG_FILE=$2
		shift
		;;
	--config=*) CONFIG_FILE=${1#--config=} ;;
	--set)
		(($# >= 2)) || die "--set needs KEY=VALUE"
		SETS+=("$2")
		shift
		;;
	--set=*) SETS+=("${1#--set=}") ;;
	--apply-now) APPLY_NOW=1 ;;
	--delete-checkpoints) DELETE_CHECKPOINTS=1 ;;
	--delete-disks) DELETE_DISKS=1 ;;
	--delete-buckets) DELETE_BUCKETS=1 ;;
	--delete-service-account) DELETE_SA=1 ;;
	--delete-old) DELETE_OLD=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	-*) die "unknown option: $1 (see --help)" ;;
	*)
		if [[ -z $SUBCOMMAND ]]; then SUBCOMMAND=$1; else POSITIONAL+=("$1"); fi
		;;
	esac
	shift
done
[[ -n $SUBCOMMAND ]] || {
	usage >&2
	exit 2
}

# --- settings ----------------------------------------------------------------------------------------------
cfg_setup "$CONFIG_FILE" "${SETS[@]}"

PROJECT=${CFG[PROJECT_ID]}
ZONE=${CFG[ZONE]}
REGION=${CFG[REGION]}
SA_EMAIL="${CFG[SERVICE_ACCOUNT]}@${PROJECT}.iam.gserviceaccount.com"
SA_MEMBER="serviceAccount:$SA_EMAIL"
STARTUP_URI="gs://${CFG[PROCESSED_BUCKET]}/${CFG[STARTUP_PREFIX]}"
CKPT_URI=${CFG[CHECKPOINT_URI]%/}
RUN_CKPT_URI="$CKPT_URI/${CFG[RUN_ID]}"
SELF_STOP_ROLE_NAME="projects/$PROJECT/roles/${CFG[SELF_STOP_ROLE]}"
SELF_STOP_TITLE="triplet-self-stop-$ZONE"
LABELS="app=building-triplets"
P=(--project="$PROJECT")
PZ=(--project="$PROJECT" --zone="$ZONE")

repo_path() { if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s' "$REPO_ROOT/$1"; fi; }

# Lines of $1 contain a line that starts with $2 followed by a tab or the end of the line.
has_row() {
	local rows=$1 want=$2 row
	while IFS= read -r row; do
		[[ $row == "$want" || $row == "$want"$'\t'* ]] && return 0
	done <<<"$rows"
	return 1
}

# --- apis --------------------------------------------------------------------------------------------------
REQUIRED_APIS=(compute.googleapis.com storage.googleapis.com logging.googleapis.com monitoring.googleapis.com
	iam.googleapis.com cloudresourcemanager.googleapis.com)

do_apis() {
	step "apis"
	local enabled="" api missing=()
	gc_look enabled services list --enabled "${P[@]}" --format='value(config.name)' || true
	for api in "${REQUIRED_APIS[@]}"; do
		has_row "$enabled" "$api" || missing+=("$api")
	done
	if ((${#missing[@]})); then gc_run services enable "${missing[@]}" "${P[@]}"; fi

	local meta=""
	gc_look meta compute project-info describe "${P[@]}" --flatten='commonInstanceMetadata.items[]' \
		--format='value(commonInstanceMetadata.items.key,commonInstanceMetadata.items.value)' || true
	if ! has_row "$meta" "google-compute-default-region"$'\t'"$REGION" ||
		! has_row "$meta" "google-compute-default-zone"$'\t'"$ZONE"; then
		gc_run compute project-info add-metadata "${P[@]}" \
			--metadata="google-compute-default-region=$REGION,google-compute-default-zone=$ZONE"
	fi
}

# --- buckets -----------------------------------------------------------------------------------------------
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

# --- service account ---------------------------------------------------------------------------------------
PROJECT_ROLES=(roles/logging.logWriter roles/monitoring.metricWriter)
SELF_STOP_PERMISSIONS=compute.instances.get,compute.instances.stop,compute.instances.delete,compute.instanceGroupManagers.get,compute.instanceGroupManagers.update,compute.zoneOperations.get

self_stop_condition() {
	# No commas: gcloud splits --condition on them. Names: the single VM and the group's VMs (VM_NAME-xxxx),
	# the group itself, and the zone's operations (gcloud waits on them).
	local base="projects/$PROJECT/zones/$ZONE"
	printf '%s' "expression=resource.name.startsWith(\"$base/instances/${CFG[VM_NAME]}\")"
	printf '%s' " || resource.name == \"$base/instanceGroupManagers/${CFG[MIG_NAME]}\""
	printf '%s' " || resource.name.startsWith(\"$base/operations/\")"
	printf '%s' ",title=$SELF_STOP_TITLE,description=Preprocessing VM may stop or delete itself (ON_DONE)"
}

do_service_account() {
	step "service-account"
	local out="" policy=""
	if ! gc_look out iam service-accounts describe "$SA_EMAIL" "${P[@]}" --format='value(email)'; then
		gc_run iam service-accounts create "${CFG[SERVICE_ACCOUNT]}" "${P[@]}" \
			--display-name="Building triplets preprocessing VM" \
			--description="Attached to the preprocessing VM; no keys. Managed by gcp/provision.sh."
	fi

	# Object admin on the two buckets only (bucket-level bindings, not project-wide Storage Admin).
	local bucket
	for bucket in "${CFG[RAW_BUCKET]}" "${CFG[PROCESSED_BUCKET]}"; do
		if ! gc_look policy storage buckets get-iam-policy "gs://$bucket" "${P[@]}" \
			--flatten='bindings[].members' --format='value(bindings.role,bindings.members)' && ((!DRY_RUN)); then
			die "bucket gs://$bucket does not exist: run 'provision.sh buckets' first"
		fi
		if ! has_row "$policy" "roles/storage.objectAdmin"$'\t'"$SA_MEMBER"; then
			gc_run_retrying storage buckets add-iam-policy-binding "gs://$bucket" "${P[@]}" \
				--member="$SA_MEMBER" --role=roles/storage.objectAdmin
		fi
	done

	# Log and metric writer: these roles exist only at project level.
	gc_look policy projects get-iam-policy "$PROJECT" --flatten='bindings[].members' \
		--format='value(bindings.role,bindings.members,bindings.condition.title)' || true
	local role
	for role in "${PROJECT_ROLES[@]}"; do
		if ! has_row "$policy" "$role"$'\t'"$SA_MEMBER"; then
			gc_run_retrying projects add-iam-policy-binding "$PROJECT" --member="$SA_MEMBER" --role="$role" \
				--condition=None
		fi
	done

	if [[ ${CFG[ON_DONE]} == none ]]; then
		note "ON_DONE=none: no compute permission for the VM's account"
		return 0
	fi
	# Self-stop/delete: a custom role with only the needed permissions, bound with an IAM condition on the
	# resource names (this VM, its group, the zone's operations) -- narrower than any predefined role, and it
	# survives the group recreating the VM (a binding on the instance itself would not).
	local deleted=""
	if gc_look deleted iam roles describe "${CFG[SELF_STOP_ROLE]}" "${P[@]}" --format='value(deleted)'; then
		if [[ ${deleted,,} == true ]]; then gc_run iam roles undelete "${CFG[SELF_STOP_ROLE]}" "${P[@]}"; fi
	else
		gc_run iam roles create "${CFG[SELF_STOP_ROLE]}" "${P[@]}" --title="Triplet preprocessing self-stop" \
			--description="Lets the preprocessing VM stop or delete itself when its run is done." \
			--permissions="$SELF_STOP_PERMISSIONS" --stage=GA
	fi
	if ! has_row "$policy" "$SELF_STOP_ROLE_NAME"$'\t'"$SA_MEMBER"$'\t'"$SELF_STOP_TITLE"; then
		gc_run_retrying projects add-iam-policy-binding "$PROJECT" --member="$SA_MEMBER" --role="$SELF_STOP_ROLE_NAME" \
			--condition="$(self_stop_condition)"
	fi
}

# --- disks -------------------------------------------------------------------------------------------------
ensure_disk() { # name size-gb zone
	local name=$1 gb=$2 zone=$3 found=""
	if gc_look found compute disks describe "$name" --project="$PROJECT" --zone="$zone" --format='value(sizeGb,type.basename())'; then
		[[ $found == "$gb"$'\t'"${CFG[DISK_TYPE]}" ]] || note "disk $name exists as '$found' (size GB, type); left as it is"
		return 0
	fi
	gc_run compute disks create "$name" --project="$PROJECT" --zone="$zone" --size="${gb}GB" \
		--type="${CFG[DISK_TYPE]}" --labels="$LABELS"
}

do_disks() {
	step "disks"
	ensure_disk "${CFG[RAW_DISK]}" "${CFG[RAW_DISK_GB]}" "$ZONE"
	ensure_disk "${CFG[WORK_DISK]}" "${CFG[WORK_DISK_GB]}" "$ZONE"
}

# --- upload-scripts ----------------------------------------------------------------------------------------
do_upload_scripts() {
	step "upload-scripts"
	local dir f found=0
	dir=$(repo_path "${CFG[SCRIPTS_DIR]}")
	for f in startup_preprocess.sh shutdown_preprocess.sh; do
		if [[ ! -f $dir/$f ]]; then
			((DRY_RUN)) || die "$dir/$f is missing (written by the bootstrap work, see docs/bootstrap.md)"
			note "warning: $dir/$f does not exist yet"
		fi
	done
	# Every script and helper the startup script may need next to it (*.sh, *.py), not the folders.
	local scripts=()
	mapfile -t scripts < <(find "$dir" -maxdepth 1 -type f \( -name '*.sh' -o -name '*.py' \) 2>/dev/null | LC_ALL=C sort)
	if ((DRY_RUN && ${#scripts[@]} == 0)); then
		scripts=("$dir/startup_preprocess.sh" "$dir/shutdown_preprocess.sh")
	fi
	for f in "${scripts[@]}"; do
		upload_if_changed "$f" "$STARTUP_URI/$(basename "$f")"
		found=1
	done
	((found)) || die "no scripts found in $dir"
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

# --- template ----------------------------------------------------------------------------------------------
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
		"triplet-checkpoint-interval-min=${CFG[CHECKPOINT_INTERVAL_MIN]}"
		"triplet-install-ops-agent=$(upper_bool "${CFG[INSTALL_OPS_AGENT]}")"
		"triplet-scripts-uri=$STARTUP_URI/"
		"triplet-deploy-mode=${CFG[DEPLOY_MODE]}"
	)
	local joined
	joined=$(
		IFS=,
		printf '%s' "${metadata[*]}"
	)
	TEMPLATE_ARGS=(
		--project="$PROJECT"
		--machine-type="${CFG[MACHINE_TYPE]}"
		--accelerator="type=${CFG[ACCELERATOR_TYPE]},count=${CFG[ACCELERATOR_COUNT]}"
		--provisioning-model="${CFG[PROVISIONING_MODEL]}"
	)
	if [[ ${CFG[PROVISIONING_MODEL]} == SPOT ]]; then
		# Spot: explicit termination action; never --restart-on-failure (the API refuses it with Spot).
		TEMPLATE_ARGS+=(--instance-termination-action="${CFG[TERMINATION_ACTION]}")
	else
		TEMPLATE_ARGS+=(--restart-on-failure)
	fi
	TEMPLATE_ARGS+=(
		--maintenance-policy=TERMINATE
		--image-family="${CFG[IMAGE_FAMILY]}"
		--image-project="${CFG[IMAGE_PROJECT]}"
		--boot-disk-size="${CFG[BOOT_DISK_GB]}GB"
		--boot-disk-type="${CFG[BOOT_DISK_TYPE]}"
		--disk="name=${CFG[RAW_DISK]},device-name=${CFG[RAW_DISK]},mode=rw,boot=no,auto-delete=no"
		--disk="name=${CFG[WORK_DISK]},device-name=${CFG[WORK_DISK]},mode=rw,boot=no,auto-delete=no"
		--no-shielded-secure-boot
		--shielded-vtpm
		--shielded-integrity-monitoring
		--service-account="$SA_EMAIL"
		--scopes=cloud-platform
		--network="${CFG[NETWORK]}"
	)
	if [[ -n ${CFG[SUBNET]} ]]; then
		TEMPLATE_ARGS+=(--subnet="projects/$PROJECT/regions/$REGION/subnetworks/${CFG[SUBNET]}")
	fi
	TEMPLATE_ARGS+=(
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

# --- status ------------------------------------------------------------------------------------------------
STATUS_PHASES=(download extract preprocess)

do_status() {
	step "status"
	local out=""
	if [[ ${CFG[DEPLOY_MODE]} == mig ]]; then
		if gc_look out compute instance-groups managed list-instances "${CFG[MIG_NAME]}" "${PZ[@]}" \
			--format='value(instance.basename(),instanceStatus,currentAction,version.instanceTemplate.basename())'; then
			printf 'group %s: %s\n' "${CFG[MIG_NAME]}" "${out:-(no VM)}"
		else
			printf 'group %s: not found\n' "${CFG[MIG_NAME]}"
		fi
	else
		if gc_look out compute instances describe "${CFG[VM_NAME]}" "${PZ[@]}" --format='value(status,lastStartTimestamp)'; then
			printf 'vm %s: %s\n' "${CFG[VM_NAME]}" "$out"
		else
			printf 'vm %s: not found\n' "${CFG[VM_NAME]}"
		fi
	fi

	local listing="" url body=""
	local urls=()
	if gc_look listing storage ls "$RUN_CKPT_URI/state/"; then
		while IFS= read -r url; do [[ $url == *.json ]] && urls+=("$url"); done <<<"$listing"
	elif ((DRY_RUN)); then
		for url in "${STATUS_PHASES[@]}"; do urls+=("$RUN_CKPT_URI/state/$url.json"); done
	fi
	((${#urls[@]})) || printf 'markers: none yet under %s/state/\n' "$RUN_CKPT_URI"
	for url in "${urls[@]}"; do
		if gc_look body storage cat "$url"; then
			printf 'marker %s: %s\n' "$(basename "$url" .json)" "$(tr -d '\n' <<<"$body")"
		fi
	done

	local ops="" count=0 line
	gc_look ops compute operations list "${P[@]}" --zones="$ZONE" \
		--filter="operationType=compute.instances.preempted AND targetLink~/instances/${CFG[VM_NAME]}" \
		--format='value(insertTime)' || true
	while IFS= read -r line; do [[ -n $line ]] && count=$((count + 1)); done <<<"$ops"
	printf 'preemptions recorded by Compute Engine (operations kept for a limited time): %d\n' "$count"
}

# --- teardown ----------------------------------------------------------------------------------------------
do_teardown() {
	step "teardown"
	local out=""
	if gc_probe out compute instance-groups managed describe "${CFG[MIG_NAME]}" "${PZ[@]}" --format='value(name)'; then
		gc_run compute instance-groups managed delete "${CFG[MIG_NAME]}" "${PZ[@]}" --quiet
	fi
	if gc_probe out compute instances describe "${CFG[VM_NAME]}" "${PZ[@]}" --format='value(name)'; then
		# --keep-disks=data: belt and braces, the data disks have auto-delete off anyway.
		gc_run compute instances delete "${CFG[VM_NAME]}" "${PZ[@]}" --keep-disks=data --quiet
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

teardown_service_account() {
	local policy="" role bucket out=""
	gc_probe policy projects get-iam-policy "$PROJECT" --flatten='bindings[].members' \
		--format='value(bindings.role,bindings.members,bindings.condition.title)' || true
	for role in "${PROJECT_ROLES[@]}" "$SELF_STOP_ROLE_NAME"; do
		if ((DRY_RUN)) || has_row "$policy" "$role"$'\t'"$SA_MEMBER"; then
			gc_run projects remove-iam-policy-binding "$PROJECT" --member="$SA_MEMBER" --role="$role" --all
		fi
	done
	if ((!DELETE_BUCKETS)); then
		for bucket in "${CFG[RAW_BUCKET]}" "${CFG[PROCESSED_BUCKET]}"; do
			if ! gc_probe policy storage buckets get-iam-policy "gs://$bucket" "${P[@]}" \
				--flatten='bindings[].members' --format='value(bindings.role,bindings.members)'; then
				continue
			fi
			if ((DRY_RUN)) || has_row "$policy" "roles/storage.objectAdmin"$'\t'"$SA_MEMBER"; then
				gc_run storage buckets remove-iam-policy-binding "gs://$bucket" "${P[@]}" \
					--member="$SA_MEMBER" --role=roles/storage.objectAdmin
			fi
		done
	fi
	local deleted=""
	if gc_probe deleted iam roles describe "${CFG[SELF_STOP_ROLE]}" "${P[@]}" --format='value(deleted)'; then
		[[ ${deleted,,} == true ]] || gc_run iam roles delete "${CFG[SELF_STOP_ROLE]}" "${P[@]}" --quiet
	fi
	if gc_probe out iam service-accounts describe "$SA_EMAIL" "${P[@]}" --format='value(email)'; then
		gc_run iam service-accounts delete "$SA_EMAIL" "${P[@]}" --quiet
	fi
}

# --- move-zone ---------------------------------------------------------------------------------------------
do_move_zone() {
	local target=${POSITIONAL[0]:-}
	[[ $target =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "move-zone needs the target zone, e.g. move-zone us-central1-b"
	[[ $target != "$ZONE" ]] || die "the disks are already in $ZONE"
	step "move-zone $ZONE -> $target"
	local out=""
	if gc_look out compute instance-groups managed describe "${CFG[MIG_NAME]}" "${PZ[@]}" --format='value(name)' ||
		gc_look out compute instances describe "${CFG[VM_NAME]}" "${PZ[@]}" --format='value(name)'; then
		die "a VM or group in $ZONE still uses the disks: run 'provision.sh teardown' first (disks are kept)"
	fi
	local disk gb snap
	for disk in "${CFG[RAW_DISK]}:${CFG[RAW_DISK_GB]}" "${CFG[WORK_DISK]}:${CFG[WORK_DISK_GB]}"; do
		gb=${disk#*:}
		disk=${disk%%:*}
		snap="$disk-to-$target"
		if ! gc_look out compute snapshots describe "$snap" "${P[@]}" --format='value(status)'; then
			gc_run compute disks snapshot "$disk" "${PZ[@]}" --snapshot-names="$snap" --storage-location="$REGION"
		fi
		if ! gc_look out compute disks describe "$disk" --project="$PROJECT" --zone="$target" --format='value(name)'; then
			gc_run compute disks create "$disk" --project="$PROJECT" --zone="$target" --source-snapshot="$snap" \
				--size="${gb}GB" --type="${CFG[DISK_TYPE]}" --labels="$LABELS"
		fi
		if ((DELETE_OLD)); then
			if gc_probe out compute disks describe "$disk" "${PZ[@]}" --format='value(name)'; then
				gc_run compute disks delete "$disk" "${PZ[@]}" --quiet
			fi
			if gc_probe out compute snapshots describe "$snap" "${P[@]}" --format='value(status)'; then
				gc_run compute snapshots delete "$snap" "${P[@]}" --quiet
			fi
		fi
	done
	note "next: set ZONE=$target in the config, then run: provision.sh service-account ${CFG[DEPLOY_MODE]}"
}

# --- dispatch ----------------------------------------------------------------------------------------------
case $SUBCOMMAND in
apis) do_apis ;;
buckets) do_buckets ;;
service-account) do_service_account ;;
disks) do_disks ;;
upload-scripts) do_upload_scripts ;;
template) do_template ;;
mig) do_mig ;;
vm) do_vm ;;
all)
	do_apis
	do_buckets
	do_service_account
	do_disks
	do_upload_scripts
	do_template
	if [[ ${CFG[DEPLOY_MODE]} == mig ]]; then do_mig; else do_vm; fi
	;;
status) do_status ;;
teardown) do_teardown ;;
move-zone) do_move_zone ;;
*) die "unknown subcommand '$SUBCOMMAND' (see --help)" ;;
esac
((DRY_RUN)) || log "done: $SUBCOMMAND"
