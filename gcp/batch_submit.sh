#!/usr/bin/env bash
# Runs the preprocessing on N Spot VMs with Google Cloud Batch, then merges their shards into one artifact.
#
#   gcp/batch_submit.sh [--dry-run] [--config FILE] [--set KEY=VALUE]... SUBCOMMAND [options]
#
# Subcommands:
#   setup     enable the Batch API; give the VM service account roles/batch.agentReporter (look first).
#             Run `gcp/provision.sh apis buckets service-account upload-scripts` before (same config).
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
JOB_NAME=""
MERGE_JOB_NAME=""
WAIT=0
POLL_S=${BATCH_POLL_S:-60}
[[ $POLL_S =~ ^[1-9][0-9]{0,4}$ ]] || die "BATCH_POLL_S must be a number of seconds"

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
	--job-name)
		(($# >= 2)) || die "--job-name needs a name"
		JOB_NAME=$2
		shift
		;;
	--merge-job-name)
		(($# >= 2)) || die "--merge-job-name needs a name"
		MERGE_JOB_NAME=$2
		shift
		;;
	--wait) WAIT=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	-*) die "unknown option: $1 (see --help)" ;;
	*)
		[[ -z $SUBCOMMAND ]] || die "one subcommand at a time"
		SUBCOMMAND=$1
		;;
	esac
	shift
done
[[ -n $SUBCOMMAND ]] || {
	usage >&2
	exit 2
}

cfg_setup "$CONFIG_FILE" "${SETS[@]}"

JOB_RE='^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'
PROJECT=${CFG[PROJECT_ID]}
LOCATION=${CFG[BATCH_LOCATION]}
JOB_NAME=${JOB_NAME:-${CFG[BATCH_JOB_PREFIX]}-${CFG[RUN_ID]}-workers}
MERGE_JOB_NAME=${MERGE_JOB_NAME:-${CFG[BATCH_JOB_PREFIX]}-${CFG[RUN_ID]}-merge}
[[ $JOB_NAME =~ $JOB_RE ]] || die "invalid job name '$JOB_NAME' (lowercase letters, digits, '-', at most 63)"
[[ $MERGE_JOB_NAME =~ $JOB_RE ]] || die "invalid job name '$MERGE_JOB_NAME'"
SA_EMAIL="${CFG[SERVICE_ACCOUNT]}@${PROJECT}.iam.gserviceaccount.com"
SA_MEMBER="serviceAccount:$SA_EMAIL"
STARTUP_URI="gs://${CFG[PROCESSED_BUCKET]}/${CFG[STARTUP_PREFIX]}"
PREPROCESS_CONFIG_URI="$STARTUP_URI/runs/${CFG[RUN_ID]}/preprocess.yaml"
RENDER_DIR=$REPO_ROOT/build/batch
PL=(--project="$PROJECT" --location="$LOCATION")

repo_path() { if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s' "$REPO_ROOT/$1"; fi; }

has_row() {
	local rows=$1 want=$2 row
	while IFS= read -r row; do
		[[ $row == "$want" || $row == "$want"$'\t'* ]] && return 0
	done <<<"$rows"
	return 1
}

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
		[SCRIPTS_URI]=$(json_str "$STARTUP_URI/")
		[CHECKPOINT_INTERVAL_MIN]=$(json_str "${CFG[CHECKPOINT_INTERVAL_MIN]}")
		[RAW_DISK]=$(json_str "${CFG[RAW_DISK]}")
		[WORK_DISK]=$(json_str "${CFG[WORK_DISK]}")
		[ACCELERATOR_TYPE]=$(json_str "${CFG[ACCELERATOR_TYPE]}")
		[ACCELERATOR_COUNT]=$(json_str "${CFG[ACCELERATOR_COUNT]}")
		[BOOT_IMAGE]=$(json_str "${CFG[BATCH_BOOT_IMAGE]}")
		[BOOT_DISK_GB]=$(json_str "${CFG[BOOT_DISK_GB]}")
		[BOOT_DISK_TYPE]=$(json_str "${CFG[BOOT_DISK_TYPE]}")
		[DISK_TYPE]=$(json_str "${CFG[DISK_TYPE]}")
		[MAX_RETRY_COUNT]=${CFG[BATCH_MAX_RETRY_COUNT]}
		[RETRY_EXIT_CODES]=$(json_list "${CFG[BATCH_RETRY_EXIT_CODES]}" int)
		[ALLOWED_LOCATIONS]=$(json_list "${CFG[BATCH_ALLOWED_LOCATIONS]}" str)
		[SERVICE_ACCOUNT_EMAIL]=$(json_str "$SA_EMAIL")
		[INSTALL_GPU_DRIVERS]=${CFG[BATCH_INSTALL_GPU_DRIVERS]}
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
	local enabled="" policy=""
	gc_look enabled services list --enabled --project="$PROJECT" --format='value(config.name)' || true
	has_row "$enabled" batch.googleapis.com || gc_run services enable batch.googleapis.com --project="$PROJECT"
	# Batch VMs report their state through the job's service account.
	gc_look policy projects get-iam-policy "$PROJECT" --flatten='bindings[].members' \
		--format='value(bindings.role,bindings.members,bindings.condition.title)' || true
	if ! has_row "$policy" "roles/batch.agentReporter"$'\t'"$SA_MEMBER"; then
		gc_run_retrying projects add-iam-policy-binding "$PROJECT" --member="$SA_MEMBER" --role=roles/batch.agentReporter \
			--condition=None
	fi
}

job_state() { # job-name var -> 0 when the job exists
	gc_look "$2" batch jobs describe "$1" "${PL[@]}" --format='value(status.state)'
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
	gc_run batch jobs submit "$JOB_NAME" "${PL[@]}" --config="$out"
}

do_status() {
	step "batch status"
	local name state="" tasks=""
	for name in "$JOB_NAME" "$MERGE_JOB_NAME"; do
		if gc_probe state batch jobs describe "$name" "${PL[@]}" --format='value(status.state)'; then
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
	gc_run batch jobs submit "$MERGE_JOB_NAME" "${PL[@]}" --config="$out"
}

do_delete() {
	step "batch delete"
	local name state=""
	for name in "$MERGE_JOB_NAME" "$JOB_NAME"; do
		if gc_probe state batch jobs describe "$name" "${PL[@]}" --format='value(status.state)'; then
			gc_run batch jobs delete "$name" "${PL[@]}" --quiet
		fi
	done
}

case $SUBCOMMAND in
setup) do_setup ;;
submit) do_submit ;;
status) do_status ;;
merge) do_merge ;;
delete) do_delete ;;
*) die "unknown subcommand '$SUBCOMMAND' (see --help)" ;;
esac
((DRY_RUN)) || log "done: $SUBCOMMAND"
