#!/usr/bin/env bash
# Runs the preprocessing on N Spot VMs with Google Cloud Batch, then merges their shards into one artifact.
#
#   gcp/batch_submit.sh [--dry-run] [--config FILE] [--set KEY=VALUE]... SUBCOMMAND [options]
#
# Subcommands:
#   setup     enable the Batch API; give the VM service account roles/batch.agentReporter (look first).
#             Run `gcp/provision.sh apis buckets service-account upload-scripts` before (same config), and
#             `gcp/provision.sh image` with USE_BAKED_IMAGE=true (the workers boot from the baked image).
#   submit    upload the preprocess YAML next to the startup scripts, render the worker job from
#             gcp/batch/worker-job.json into build/batch/, and submit it unless a job of that name exists:
#             BATCH_TASK_COUNT tasks (TASK_INDEX = BATCH_TASK_INDEX), BATCH_PARALLELISM at once, Spot
#             g2-standard-16 + L4, retried on preemption only (exit code 50001), up to BATCH_MAX_RETRY_COUNT.
#   status    state of the worker and merge jobs and of each task
#   merge     when the worker job has SUCCEEDED, submit the merge job (gcp/batch/merge-job.json: one CPU VM
#             that builds splits, KNN and the final artifact from every archive's shard)
#     --wait    first wait for the worker job to finish (polls every BATCH_POLL_S seconds, default 60)
#   delete    delete the worker and merge jobs (their VMs go; checkpoints and artifacts in the bucket stay)
# Options of submit/status/merge/delete:
#   --job-name NAME        the worker job (default BATCH_JOB_PREFIX-RUN_ID-workers). A job name is used once:
#                          to retry a FAILED job, submit again with a new name; it resumes from checkpoints.
#   --merge-job-name NAME  the merge job (default BATCH_JOB_PREFIX-RUN_ID-merge)
# Common options: --dry-run (print the exact gcloud commands; the job JSON is still rendered), --config, --set,
# as in gcp/provision.sh. Guide: docs/preprocessing_gcp.md, section 7.
#
# Each task fetches only startup_preprocess.sh from the bucket and runs it; its stage 0 clones REPO_URL at
# REPO_REF. installGpuDrivers is false in both jobs, always: the startup script's `system` step is the one
# driver path of every VM (Debian 12's nvidia-driver, the 535 branch the locked CUDA 12 torch runs on), and
# the baked image already holds it; Batch's own installer would put a different driver beside it.
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=gcp/provision_common.sh
source "$SCRIPT_DIR/provision_common.sh"

trap 'log "ERROR: failed at line $LINENO: $BASH_COMMAND"' ERR

JOB_NAME=""
MERGE_JOB_NAME=""
WAIT=0
POLL_S=${BATCH_POLL_S:-60}
[[ $POLL_S =~ ^[1-9][0-9]{0,4}$ ]] || die "BATCH_POLL_S must be a number of seconds"
OPT_FLAG=([--wait]=WAIT)
OPT_VALUE=([--job-name]=JOB_NAME [--merge-job-name]=MERGE_JOB_NAME)
ARGS_MAX=0
parse_args "$@"

cfg_setup "$CONFIG_FILE" "${SETS[@]}"

JOB_RE='^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'
LOCATION=${CFG[BATCH_LOCATION]}
JOB_NAME=${JOB_NAME:-${CFG[BATCH_JOB_PREFIX]}-${CFG[RUN_ID]}-workers}
MERGE_JOB_NAME=${MERGE_JOB_NAME:-${CFG[BATCH_JOB_PREFIX]}-${CFG[RUN_ID]}-merge}
[[ $JOB_NAME =~ $JOB_RE ]] || die "invalid job name '$JOB_NAME' (lowercase letters, digits, '-', at most 63)"
[[ $MERGE_JOB_NAME =~ $JOB_RE ]] || die "invalid job name '$MERGE_JOB_NAME'"
PREPROCESS_CONFIG_URI="$STARTUP_URI/runs/${CFG[RUN_ID]}/preprocess.yaml"
RENDER_DIR=$PROVISION_REPO/build/batch
PL=(--project="$PROJECT" --location="$LOCATION")
boot_image

# --- job JSON ----------------------------------------------------------------------------------------------
# Every placeholder in the templates is a whole JSON value, "@@NAME@@". Values were checked against their
# key's pattern (no quotes, backslashes or control characters), so they are written into JSON as they are.
json_str() { printf '"%s"' "$1"; }
json_list() { # comma-separated items -> JSON array; $2=str|int
	local IFS=, item out="" sep=""
	for item in $1; do
		if [[ $2 == int ]]; then out+="$sep$item"; else out+="$sep\"$item\""; fi
		sep=", "
	done
	printf '[%s]' "$out"
}

render_job() { # mode(worker|merge) template output
	local mode=$1 text
	text=$(<"$2")
	local -A v=(
		[RUN_ID]=$(json_str "${CFG[RUN_ID]}")
		[CHECKPOINT_URI]=$(json_str "${CFG[CHECKPOINT_URI]%/}")
		[MANIFEST_URI]=$(json_str "${CFG[MANIFEST_URI]}")
		[REPO_URL]=$(json_str "${CFG[REPO_URL]}")
		[REPO_REF]=$(json_str "${CFG[REPO_REF]}")
		[PREPROCESS_CONFIG_URI]=$(json_str "$PREPROCESS_CONFIG_URI")
		[STARTUP_SCRIPT_URI]=$(json_str "$STARTUP_URI/startup_preprocess.sh")
		[PUSH_INTERVAL_MIN]=$(json_str "${CFG[PUSH_INTERVAL_MIN]}")
		[RAW_DISK]=$(json_str "${CFG[RAW_DISK]}")
		[WORK_DISK]=$(json_str "${CFG[WORK_DISK]}")
		[ACCELERATOR_TYPE]=$(json_str "${CFG[ACCELERATOR_TYPE]}")
		[ACCELERATOR_COUNT]=$(json_str "${CFG[ACCELERATOR_COUNT]}")
		[BOOT_IMAGE]=$(json_str "$BOOT_IMAGE")
		[BOOT_DISK_GB]=$(json_str "${CFG[BOOT_DISK_GB]}")
		[BOOT_DISK_TYPE]=$(json_str "${CFG[BOOT_DISK_TYPE]}")
		[DISK_TYPE]=$(json_str "${CFG[DISK_TYPE]}")
		[MAX_RETRY_COUNT]=${CFG[BATCH_MAX_RETRY_COUNT]}
		[RETRY_EXIT_CODES]=$(json_list "${CFG[BATCH_RETRY_EXIT_CODES]}" int)
		[ALLOWED_LOCATIONS]=$(json_list "${CFG[BATCH_ALLOWED_LOCATIONS]}" str)
		[SERVICE_ACCOUNT_EMAIL]=$(json_str "$SA_EMAIL")
		[INSTALL_OPS_AGENT]=${CFG[INSTALL_OPS_AGENT]}
	)
	if [[ $mode == worker ]]; then
		v[MACHINE_TYPE]=$(json_str "${CFG[MACHINE_TYPE]}")
		v[PROVISIONING_MODEL]=$(json_str SPOT)
		v[TASK_COUNT]=${CFG[BATCH_TASK_COUNT]}
		v[PARALLELISM]=${CFG[BATCH_PARALLELISM]}
		v[RAW_DISK_GB]=$(json_str "${CFG[BATCH_RAW_DISK_GB]}")
		v[WORK_DISK_GB]=$(json_str "${CFG[BATCH_WORK_DISK_GB]}")
	else
		v[MACHINE_TYPE]=$(json_str "${CFG[BATCH_MERGE_MACHINE_TYPE]}")
		v[PROVISIONING_MODEL]=$(json_str "${CFG[BATCH_MERGE_PROVISIONING_MODEL]}")
		v[TASK_COUNT]=1
		v[PARALLELISM]=1
		v[RAW_DISK_GB]=$(json_str 10)
		v[WORK_DISK_GB]=$(json_str "${CFG[BATCH_MERGE_WORK_DISK_GB]}")
	fi
	local key
	for key in "${!v[@]}"; do
		text=${text//\"@@$key@@\"/${v[$key]}}
	done
	[[ $text != *@@* ]] || die "unrendered placeholder in $2: $(grep -o '@@[A-Z_]*@@' <<<"$text" | head -1)"
	mkdir -p "$(dirname "$3")"
	printf '%s\n' "$text" >"$3.tmp"
	mv -f "$3.tmp" "$3"
	note "rendered $3"
}

# --- subcommands -------------------------------------------------------------------------------------------
do_setup() {
	step "batch setup"
	local policy=""
	enable_apis batch.googleapis.com
	# Batch VMs report their state through the job's service account.
	project_policy policy
	grant_project_role "$policy" "$BATCH_AGENT_ROLE"
}

# The workers boot from the baked image family when USE_BAKED_IMAGE=true: it must have an image, or every VM of
# the job would fail to be created.
require_boot_image() {
	[[ ${CFG[USE_BAKED_IMAGE]} == true ]] || return 0
	local found=""
	if gc_look found compute images describe-from-family "$BOOT_IMAGE_FAMILY" --project="$PROJECT" --format='value(name)'; then
		((DRY_RUN)) || note "the VMs boot from $BOOT_IMAGE (now $found)"
	elif ((!DRY_RUN)); then
		die "the image family $BOOT_IMAGE_FAMILY has no image yet: run 'gcp/provision.sh image' first (or set USE_BAKED_IMAGE=false)"
	fi
}

# job_state NAME VAR [LOOK]: 0 when the job exists; its state in VAR. LOOK is gc_look (default) or gc_probe,
# for a dry run of status and delete to show a job that exists.
job_state() {
	"${3:-gc_look}" "$2" batch jobs describe "$1" "${PL[@]}" --format='value(status.state)'
}

do_submit() {
	step "batch submit $JOB_NAME"
	local cfg
	cfg=$(repo_path "${CFG[PREPROCESS_CONFIG]}")
	[[ -f $cfg ]] || ((DRY_RUN)) || die "PREPROCESS_CONFIG $cfg does not exist"
	upload_if_changed "$cfg" "$PREPROCESS_CONFIG_URI"
	local out="$RENDER_DIR/$JOB_NAME.json" state=""
	render_job worker "$SCRIPT_DIR/batch/worker-job.json" "$out"
	if job_state "$JOB_NAME" state; then
		note "job $JOB_NAME exists ($state); submit again with --job-name NAME to start another attempt"
		return 0
	fi
	require_boot_image
	gc_run batch jobs submit "$JOB_NAME" "${PL[@]}" --config="$out"
}

do_status() {
	step "batch status"
	local name state="" tasks=""
	for name in "$JOB_NAME" "$MERGE_JOB_NAME"; do
		if job_state "$name" state gc_probe; then
			printf 'job %s: %s\n' "$name" "$state"
			gc_look tasks batch tasks list --job="$name" "${PL[@]}" \
				--format='value(name.basename(),status.state)' || true
			[[ -z $tasks ]] || printf '%s\n' "$tasks"
		else
			printf 'job %s: not found\n' "$name"
		fi
	done
}

do_merge() {
	step "batch merge"
	local state=""
	if ((WAIT && !DRY_RUN)); then
		while job_state "$JOB_NAME" state && [[ $state =~ ^(QUEUED|SCHEDULED|RUNNING|STATE_UNSPECIFIED)$ ]]; do
			log "worker job $JOB_NAME is $state; next check in ${POLL_S}s"
			sleep "$POLL_S"
		done
	fi
	if ! job_state "$JOB_NAME" state && ((!DRY_RUN)); then
		die "worker job $JOB_NAME not found (--job-name names it)"
	fi
	if ((!DRY_RUN)) && [[ $state != SUCCEEDED ]]; then
		die "worker job $JOB_NAME is $state, not SUCCEEDED: fix and resubmit the workers first (see status)"
	fi
	local out="$RENDER_DIR/$MERGE_JOB_NAME.json" mstate=""
	render_job merge "$SCRIPT_DIR/batch/merge-job.json" "$out"
	if job_state "$MERGE_JOB_NAME" mstate; then
		note "merge job $MERGE_JOB_NAME exists ($mstate)"
		return 0
	fi
	require_boot_image
	gc_run batch jobs submit "$MERGE_JOB_NAME" "${PL[@]}" --config="$out"
}

do_delete() {
	step "batch delete"
	local name state=""
	for name in "$MERGE_JOB_NAME" "$JOB_NAME"; do
		if job_state "$name" state gc_probe; then
			gc_run batch jobs delete "$name" "${PL[@]}" --quiet
		fi
	done
}

# The jobs hand REPO_URL and REPO_REF to their VMs: the ref must be there before one is submitted.
case $SUBCOMMAND in
submit | merge) check_repo_ref ;;
esac
case $SUBCOMMAND in
setup) do_setup ;;
submit) do_submit ;;
status) do_status ;;
merge) do_merge ;;
delete) do_delete ;;
*) die "unknown subcommand '$SUBCOMMAND' (see --help)" ;;
esac
((DRY_RUN)) || log "done: $SUBCOMMAND"
