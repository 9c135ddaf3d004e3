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
#   upload-scripts    startup_preprocess.sh, shutdown_preprocess.sh, the Ops Agent config and the manifest
#   image             bake BAKED_IMAGE_FAMILY once: a builder VM installs the NVIDIA driver, aria2, git and uv,
#                     powers itself off, and its boot disk becomes the family's image   [USE_BAKED_IMAGE=true]
#     --rebuild         bake a new image even when the family has one
#   template          the instance template (immutable: its name carries a fingerprint of its settings)
#   mig               the managed instance group of size 1 (stateful disks)    [DEPLOY_MODE=mig]
#     --apply-now       replace the group's VM now when the template changed (default: at next recreation)
#   vm                a single VM from the template (alternative to mig)        [DEPLOY_MODE=vm]
#   setup             apis buckets service-account disks upload-scripts [image] template: everything but the VM
#   all               setup, then mig or vm (the VM starts the run)
#   status            VM state, the baked image, phase markers from the bucket, preemptions so far
#   mirror            the manifest's archives into RAW_BUCKET (verified, resumable; run it again after any
#                     interruption), and a manifest reading them from there next to MANIFEST_URI
#   weights           the hub weights of PREPROCESS_CONFIG's model into PROCESSED_BUCKET/weights, once
#   smoke-benchmark   benchmarks/gpu.py on the run's L4 (the job paused meanwhile); its figures into the bucket
#                     and benchmarks/results/gpu.json, which the cost model reads
#   fetch [DEST]      the finished artifact, its stats and rejects files, verified (default build/results/RUN_ID)
#   teardown          delete the group, the VM, a leftover image builder and the templates; data only with
#                     explicit flags:
#     --delete-checkpoints       the run's checkpoints (CHECKPOINT_URI/RUN_ID/, all versions)
#     --delete-disks             the two data disks
#     --delete-buckets           both buckets and everything in them
#     --delete-images            every image of BAKED_IMAGE_FAMILY
#     --delete-service-account   the service account, every binding given to it, and the self-stop role
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
# PROVISION_POLL_S: seconds between looks at the image builder (default 30).
#
# Settings: gcp/provision.conf (read line by line, never sourced). Guide: docs/preprocessing_gcp.md.
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=gcp/provision_common.sh
source "$SCRIPT_DIR/provision_common.sh"
# One file per subcommand (move-zone: disks.sh, upload-scripts: buckets.sh, template/mig/vm: deploy.sh).
# shellcheck source=gcp/provision.d/apis.sh
source "$SCRIPT_DIR/provision.d/apis.sh"
# shellcheck source=gcp/provision.d/buckets.sh
source "$SCRIPT_DIR/provision.d/buckets.sh"
# shellcheck source=gcp/provision.d/service_account.sh
source "$SCRIPT_DIR/provision.d/service_account.sh"
# shellcheck source=gcp/provision.d/disks.sh
source "$SCRIPT_DIR/provision.d/disks.sh"
# shellcheck source=gcp/provision.d/image.sh
source "$SCRIPT_DIR/provision.d/image.sh"
# shellcheck source=gcp/provision.d/deploy.sh
source "$SCRIPT_DIR/provision.d/deploy.sh"
# shellcheck source=gcp/provision.d/status.sh
source "$SCRIPT_DIR/provision.d/status.sh"
# shellcheck source=gcp/provision.d/teardown.sh
source "$SCRIPT_DIR/provision.d/teardown.sh"
# shellcheck source=gcp/provision.d/operate.sh
source "$SCRIPT_DIR/provision.d/operate.sh"

trap 'log "ERROR: failed at line $LINENO: $BASH_COMMAND"' ERR

APPLY_NOW=0
REBUILD=0
DELETE_CHECKPOINTS=0
DELETE_DISKS=0
DELETE_BUCKETS=0
DELETE_IMAGES=0
DELETE_SA=0
DELETE_OLD=0
OPT_FLAG=(
	[--apply-now]=APPLY_NOW
	[--rebuild]=REBUILD
	[--delete-checkpoints]=DELETE_CHECKPOINTS
	[--delete-disks]=DELETE_DISKS
	[--delete-buckets]=DELETE_BUCKETS
	[--delete-images]=DELETE_IMAGES
	[--delete-service-account]=DELETE_SA
	[--delete-old]=DELETE_OLD
)
ARGS_MAX=1 # move-zone ZONE, fetch DEST
parse_args "$@"
[[ $SUBCOMMAND == move-zone || $SUBCOMMAND == fetch || ${#ARGS[@]} -eq 0 ]] || die "'$SUBCOMMAND' takes no argument: ${ARGS[*]} (see --help)"

# --- settings ----------------------------------------------------------------------------------------------
cfg_setup "$CONFIG_FILE" "${SETS[@]}"

ZONE=${CFG[ZONE]}
REGION=${CFG[REGION]}
CKPT_URI=${CFG[CHECKPOINT_URI]%/}
RUN_CKPT_URI="$CKPT_URI/${CFG[RUN_ID]}"
SELF_STOP_ROLE_NAME="projects/$PROJECT/roles/${CFG[SELF_STOP_ROLE]}"
SELF_STOP_TITLE="triplet-self-stop-$ZONE"
P=(--project="$PROJECT")
PZ=(--project="$PROJECT" --zone="$ZONE")

BUILDER_NAME="${CFG[BAKED_IMAGE_FAMILY]}-builder"

# --- dispatch ----------------------------------------------------------------------------------------------
# What hands REPO_URL and REPO_REF to a VM checks first that the ref is there (before anything is created).
case $SUBCOMMAND in
setup | all | image | template | mig | vm) check_repo_ref ;;
esac
case $SUBCOMMAND in
apis) do_apis ;;
buckets) do_buckets ;;
service-account) do_service_account ;;
disks) do_disks ;;
upload-scripts) do_upload_scripts ;;
image) do_image ;;
template) do_template ;;
mig) do_mig ;;
vm) do_vm ;;
setup | all)
	do_apis
	do_buckets
	do_service_account
	do_disks
	do_upload_scripts
	if [[ ${CFG[USE_BAKED_IMAGE]} == true ]]; then do_image; fi
	do_template
	if [[ $SUBCOMMAND == all ]]; then
		if [[ ${CFG[DEPLOY_MODE]} == mig ]]; then do_mig; else do_vm; fi
	fi
	;;
status) do_status ;;
mirror) do_mirror ;;
weights) do_weights ;;
smoke-benchmark) do_smoke_benchmark ;;
fetch) do_fetch ;;
teardown) do_teardown ;;
move-zone) do_move_zone ;;
*) die "unknown subcommand '$SUBCOMMAND' (see --help)" ;;
esac
((DRY_RUN)) || log "done: $SUBCOMMAND"
