# shellcheck shell=bash
# The settings of one invocation of gcp/provision.sh or gcp/batch_submit.sh: the configuration file's keys and
# their patterns, the reader, the cross-key checks, the empty PROJECT_ID and REPO_URL resolved, and the names
# both scripts derive from them. Sourced by gcp/provision_common.sh, never run.
#
# gcp/provision.conf holds KEY=VALUE lines. It is READ, line by line, and every value is checked against the
# pattern of its key before use: nothing in it is sourced, evaluated or expanded. An unknown key, a missing
# key or a value that does not match its pattern stops the script.

# The run id names bucket folders, Batch jobs and labels: checked with the VM's own pattern (one place).
RUN_ID_RE=$(sysvm vm.settings pattern run-id) || die "cannot read the run-id pattern (python3 -m building_image_triplet_model.vm.settings pattern run-id)"
[[ $RUN_ID_RE == ^*$ ]] || die "unexpected run-id pattern '$RUN_ID_RE'"

# Type of every key the file must define. The values live in the file only (one source of truth).
declare -A CFG_TYPE=(
	[PROJECT_ID]=optproject
	[REGION]=region
	[ZONE]=zone
	[BUCKET_LOCATION]=region
	[RAW_BUCKET]=bucket
	[PROCESSED_BUCKET]=bucket
	[RAW_LIFECYCLE_FILE]=path
	[PROCESSED_LIFECYCLE_FILE]=path
	[PROCESSED_VERSIONING]=bool
	[SERVICE_ACCOUNT]=saname
	[SELF_STOP_ROLE]=roleid
	[RAW_DISK]=name
	[RAW_DISK_GB]=int
	[WORK_DISK]=name
	[WORK_DISK_GB]=int
	[DISK_TYPE]=disktype
	[MACHINE_TYPE]=name
	[ACCELERATOR_TYPE]=name
	[ACCELERATOR_COUNT]=int
	[IMAGE_FAMILY]=name
	[IMAGE_PROJECT]=name
	[USE_BAKED_IMAGE]=bool
	[BAKED_IMAGE_FAMILY]=name
	[BAKE_TIMEOUT_MIN]=int
	[BOOT_DISK_GB]=int
	[BOOT_DISK_TYPE]=disktype
	[PROVISIONING_MODEL]=provisioning
	[TERMINATION_ACTION]=termination
	[NETWORK]=name
	[SUBNET]=optname
	[TEMPLATE_PREFIX]=name
	[MIG_NAME]=name
	[VM_NAME]=name
	[DEPLOY_MODE]=deploy
	[STARTUP_PREFIX]=objpath
	[SCRIPTS_DIR]=path
	[OPS_AGENT_CONFIG_FILE]=path
	[RUN_ID]=runid
	[CHECKPOINT_URI]=gsuri
	[MANIFEST_URI]=gsuri
	[MANIFEST_SOURCE]=optpath
	[REPO_URL]=opturl
	[REPO_REF]=optref
	[PREPROCESS_CONFIG]=path
	[ON_DONE]=ondone
	[PUSH_INTERVAL_MIN]=int
	[INSTALL_OPS_AGENT]=bool
	[BATCH_LOCATION]=region
	[BATCH_ALLOWED_LOCATIONS]=locations
	[BATCH_JOB_PREFIX]=name
	[BATCH_TASK_COUNT]=int
	[BATCH_PARALLELISM]=int
	[BATCH_MAX_RETRY_COUNT]=retry
	[BATCH_RETRY_EXIT_CODES]=intlist
	[BATCH_RAW_DISK_GB]=int
	[BATCH_WORK_DISK_GB]=int
	[BATCH_MERGE_MACHINE_TYPE]=name
	[BATCH_MERGE_PROVISIONING_MODEL]=provisioning
	[BATCH_MERGE_WORK_DISK_GB]=int
)

declare -A CFG=()

PROJECT_RE='^[a-z][a-z0-9-]{4,28}[a-z0-9]$'
URL_RE='^(https://|ssh://|git@|file:///)[A-Za-z0-9_.:/@~+-]+$'

cfg_check_value() { # key value -> 0 when the value matches the key's pattern
	local key=$1 value=$2
	case ${CFG_TYPE[$key]} in
	optproject) [[ -z $value || $value =~ $PROJECT_RE ]] ;;
	region) [[ $value =~ ^[a-z]+-[a-z]+[0-9]+$ ]] ;;
	zone) [[ $value =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ;;
	bucket) [[ $value =~ ^[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]$ ]] ;;
	name) [[ $value =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ;;
	optname) [[ -z $value || $value =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ;;
	saname) [[ $value =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] ;;
	roleid) [[ $value =~ ^[A-Za-z0-9_.]{3,64}$ ]] ;;
	int) [[ $value =~ ^[1-9][0-9]{0,6}$ ]] ;;
	retry) [[ $value =~ ^([0-9]|10)$ ]] ;;
	intlist) [[ $value =~ ^[0-9]{1,6}(,[0-9]{1,6})*$ ]] ;;
	bool) [[ $value == true || $value == false ]] ;;
	disktype) [[ $value =~ ^(pd-standard|pd-balanced|pd-ssd|hyperdisk-balanced|hyperdisk-ml)$ ]] ;;
	provisioning) [[ $value == SPOT || $value == STANDARD ]] ;;
	termination) [[ $value == STOP || $value == DELETE ]] ;;
	deploy) [[ $value == mig || $value == vm ]] ;;
	ondone) [[ $value == none || $value == stop || $value == delete ]] ;;
	runid) [[ $value =~ $RUN_ID_RE ]] ;;
	gsuri) [[ $value =~ ^gs://[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9](/[A-Za-z0-9_.-]+)*/?$ ]] ;;
	objpath) [[ $value =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] ;;
	path) [[ $value =~ ^[A-Za-z0-9_./-]+$ && $value != *..* ]] ;;
	optpath) [[ -z $value || ($value =~ ^[A-Za-z0-9_./-]+$ && $value != *..*) ]] ;;
	opturl) [[ -z $value || $value =~ $URL_RE ]] ;;
	optref) [[ -z $value || ($value =~ ^[A-Za-z0-9][A-Za-z0-9_./-]{0,99}$ && $value != *..* && $value != *.lock && $value != */) ]] ;;
	locations) [[ $value =~ ^(regions|zones)/[a-z0-9-]+(,(regions|zones)/[a-z0-9-]+)*$ ]] ;;
	*) return 1 ;;
	esac
}

cfg_set() { # key value origin
	local key=$1 value=$2 origin=$3
	[[ -v "CFG_TYPE[$key]" ]] || die "$origin: unknown configuration key '$key'"
	cfg_check_value "$key" "$value" || die "$origin: invalid value for $key (type ${CFG_TYPE[$key]}): '$value'"
	CFG[$key]=$value
}

# Reads KEY=VALUE lines. Blank lines and lines starting with '#' are skipped. No quoting, no expansion:
# the value is everything after the first '=', taken literally, then checked against its pattern.
cfg_load_file() {
	local file=$1 line n=0
	[[ -f $file ]] || die "configuration file not found: $file"
	while IFS= read -r line || [[ -n $line ]]; do
		n=$((n + 1))
		line=${line%$'\r'}
		[[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
		[[ $line =~ ^([A-Z][A-Z0-9_]*)=(.*)$ ]] || die "$file:$n: expected KEY=VALUE"
		cfg_set "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "$file:$n"
	done <"$file"
}

cfg_require_all() {
	local key missing=()
	for key in "${!CFG_TYPE[@]}"; do
		[[ -v "CFG[$key]" ]] || missing+=("$key")
	done
	((${#missing[@]} == 0)) || die "configuration is missing: ${missing[*]}"
}

# Cross-key checks that catch what the API would refuse only later.
cfg_check_consistency() {
	[[ ${CFG[ZONE]} == "${CFG[REGION]}"-* ]] || die "ZONE ${CFG[ZONE]} is not in REGION ${CFG[REGION]}"
	if [[ ${CFG[MACHINE_TYPE]} == g2-* || ${CFG[MACHINE_TYPE]} == c3-* ]]; then
		local k
		for k in DISK_TYPE BOOT_DISK_TYPE; do
			[[ ${CFG[$k]} != pd-standard ]] ||
				die "$k=pd-standard cannot be attached to ${CFG[MACHINE_TYPE]} (G2 machines do not support Standard persistent disks); use pd-balanced"
		done
	fi
	((CFG[BATCH_PARALLELISM] <= CFG[BATCH_TASK_COUNT])) || die "BATCH_PARALLELISM must not exceed BATCH_TASK_COUNT"
	[[ ${CFG[RAW_BUCKET]} != "${CFG[PROCESSED_BUCKET]}" ]] || die "RAW_BUCKET and PROCESSED_BUCKET must differ (the VM's roles differ)"
	[[ ${CFG[BAKED_IMAGE_FAMILY]} != "${CFG[IMAGE_FAMILY]}" ]] || die "BAKED_IMAGE_FAMILY must differ from IMAGE_FAMILY"
	# Its images are FAMILY-YYYYMMDD-HHMMSS and its builder FAMILY-builder: names of at most 63 characters.
	((${#CFG[BAKED_IMAGE_FAMILY]} <= 47)) || die "BAKED_IMAGE_FAMILY must be at most 47 characters"
}

# What a dry run uses for an empty PROJECT_ID / REPO_URL that it may not resolve (it contacts nothing).
DRY_RUN_PROJECT=your-project-id
DRY_RUN_REPO_URL=https://github.com/your-org/building-image-triplet-model.git

# Empty PROJECT_ID: the operator's current project (`gcloud config get-value project`), refused when unset.
resolve_project() {
	[[ -z ${CFG[PROJECT_ID]} ]] || return 0
	if ((DRY_RUN)); then
		printf '# look: %s\n' "$(shell_quote gcloud config get-value project)"
		note "PROJECT_ID is empty: a real run uses gcloud's current project; this dry run shows $DRY_RUN_PROJECT"
		CFG[PROJECT_ID]=$DRY_RUN_PROJECT
		return 0
	fi
	local project="" err rc=0
	err=$(mktemp)
	project=$("$GCLOUD_BIN" config get-value project 2>"$err") || rc=$?
	((rc == 0)) || {
		cat "$err" >&2
		rm -f "$err"
		die "gcloud config get-value project failed (exit $rc)"
	}
	rm -f "$err"
	project=${project//[[:space:]]/}
	[[ -n $project ]] ||
		die "PROJECT_ID is empty and gcloud has no current project: run 'gcloud config set project ID', or set PROJECT_ID (--set PROJECT_ID=ID)"
	[[ $project =~ $PROJECT_RE ]] || die "gcloud's current project '$project' is not a valid project id; set PROJECT_ID"
	CFG[PROJECT_ID]=$project
	log "PROJECT_ID is empty: using gcloud's current project $project"
}

# Empty REPO_URL: the URL of this checkout's `origin` remote (what the VM clones), refused when there is none.
resolve_repo_url() {
	[[ -z ${CFG[REPO_URL]} ]] || return 0
	local url=""
	# The URL as configured: `git remote get-url` would apply this machine's url.*.insteadOf rewrites, which
	# the VM does not have.
	url=$(git -C "$PROVISION_REPO" config --get remote.origin.url 2>/dev/null) || url=""
	local why=""
	if [[ -z $url ]]; then
		why="$PROVISION_REPO has no 'origin' remote"
	elif [[ ! $url =~ $URL_RE ]]; then
		why="origin ($url) is not a URL the VM can clone (https://, ssh://, git@ or file:///)"
	fi
	if [[ -n $why ]]; then
		# A dry run contacts nothing and clones nothing: it shows the placeholder; a real run refuses.
		if ((DRY_RUN)); then
			note "REPO_URL is empty and $why; this dry run shows $DRY_RUN_REPO_URL"
			CFG[REPO_URL]=$DRY_RUN_REPO_URL
			return 0
		fi
		die "REPO_URL is empty and $why: set REPO_URL (--set REPO_URL=https://...)"
	fi
	case $url in
	https://*) ;;
	*) warn "REPO_URL is origin's $url: the VM clones it with no SSH key or local file system of yours; an https:// URL is what works there" ;;
	esac
	CFG[REPO_URL]=$url
	note "REPO_URL is empty: using origin, $url"
}

# Empty REPO_REF: the branch this checkout is on: what is being provisioned is what the VM should run.
resolve_repo_ref() {
	[[ -z ${CFG[REPO_REF]} ]] || return 0
	local branch=""
	branch=$(git -C "$PROVISION_REPO" symbolic-ref --quiet --short HEAD 2>/dev/null) || branch=""
	[[ -n $branch ]] || die "REPO_REF is empty and $PROVISION_REPO is not on a branch (detached HEAD, or not a git checkout): set REPO_REF (--set REPO_REF=BRANCH)"
	cfg_check_value REPO_REF "$branch" || die "REPO_REF is empty and this checkout's branch '$branch' is not a ref the VM accepts: set REPO_REF"
	CFG[REPO_REF]=$branch
	note "REPO_REF is empty: using this checkout's branch, $branch"
}

# The commit REPO_REF names at REPO_URL now, set by check_repo_ref: what the VM clones.
REPO_COMMIT=""

# Checks, before anything that hands REPO_URL and REPO_REF to a VM is created, that the ref exists at the
# remote (`git ls-remote`: read-only, also in a dry run), and says which commit the VM will run. The VM
# fetches the ref when it boots, so a later push moves it; an unpushed branch is refused here, not on the VM.
check_repo_ref() {
	[[ -z $REPO_COMMIT ]] || return 0
	local url=${CFG[REPO_URL]} ref=${CFG[REPO_REF]} rows="" rc=0 sha name
	if [[ $url == "$DRY_RUN_REPO_URL" ]]; then
		note "REPO_URL is a placeholder: REPO_REF $ref is not checked (a real run needs a REPO_URL)"
		return 0
	fi
	if ((DRY_RUN)); then printf '# look: %s\n' "$(shell_quote git ls-remote -- "$url" "$ref")"; fi
	rows=$(GIT_TERMINAL_PROMPT=0 GIT_SSH_COMMAND="${GIT_SSH_COMMAND:-ssh -o BatchMode=yes}" \
		git ls-remote -- "$url" "refs/heads/$ref" "refs/tags/$ref" "refs/tags/$ref^{}" 2>&1) || rc=$?
	((rc == 0)) || die "cannot read $url (git ls-remote exit $rc): ${rows//$'\n'/ }"
	# A branch first, then a tag (an annotated tag's commit is its ^{} row).
	REPO_COMMIT=""
	local branch_sha="" tag_sha="" peeled=""
	while IFS=$'\t' read -r sha name; do
		case $name in
		"refs/heads/$ref") branch_sha=$sha ;;
		"refs/tags/$ref") tag_sha=$sha ;;
		"refs/tags/$ref^{}") peeled=$sha ;;
		esac
	done <<<"$rows"
	REPO_COMMIT=${branch_sha:-${peeled:-$tag_sha}}
	[[ -n $REPO_COMMIT ]] ||
		die "REPO_REF $ref does not exist at $url: push it first (git push origin $ref), or set REPO_REF to a branch or tag that is there"
	note "the VM will run commit $REPO_COMMIT ($ref at $url)"
	local here=""
	here=$(git -C "$PROVISION_REPO" rev-parse --quiet --verify HEAD 2>/dev/null) || here=""
	if [[ -n $here && $here != "$REPO_COMMIT" && $ref == "$(git -C "$PROVISION_REPO" symbolic-ref --quiet --short HEAD 2>/dev/null)" ]]; then
		warn "this checkout is at $here, not at $REPO_COMMIT: the VM runs what $url has (push first to run your commits)"
	fi
}

# cfg_setup FILE [KEY=VALUE...]: the settings of one invocation: the file, then the --set overrides, then
# every check, then the empty PROJECT_ID and REPO_URL resolved. A real run also refuses the placeholders
# that a dry run shows (and that older copies of the file had).
cfg_setup() {
	local file=$1 kv
	shift
	cfg_load_file "$file"
	for kv in "$@"; do
		[[ $kv =~ ^([A-Z][A-Z0-9_]*)=(.*)$ ]] || die "--set expects KEY=VALUE, got '$kv'"
		cfg_set "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "--set"
	done
	cfg_require_all
	cfg_check_consistency
	if ((!DRY_RUN)); then
		[[ ${CFG[PROJECT_ID]} != "$DRY_RUN_PROJECT" ]] || die "PROJECT_ID $DRY_RUN_PROJECT is a placeholder: set your project id, or leave it empty for gcloud's current project"
		[[ ${CFG[REPO_URL]} != *your-org* ]] || die "REPO_URL ${CFG[REPO_URL]} is a placeholder: set it, or leave it empty for this checkout's origin"
	fi
	resolve_project
	resolve_repo_url
	resolve_repo_ref
	cfg_derive
}

# Names derived from the settings, the same in both scripts.
# shellcheck disable=SC2034 # used by the scripts that source this file
cfg_derive() {
	PROJECT=${CFG[PROJECT_ID]}
	SA_EMAIL="${CFG[SERVICE_ACCOUNT]}@${PROJECT}.iam.gserviceaccount.com"
	SA_MEMBER="serviceAccount:$SA_EMAIL"
	STARTUP_URI="gs://${CFG[PROCESSED_BUCKET]}/${CFG[STARTUP_PREFIX]}"
	LABELS="app=building-triplets"
}

# A repository path (relative to the repository root) or an absolute path.
repo_path() { if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s' "$PROVISION_REPO/$1"; fi; }

# The boot image of the preprocessing VMs (instance template and Batch): the baked family in this project
# (`provision.sh image`) with USE_BAKED_IMAGE=true, else the public IMAGE_FAMILY. Sets BOOT_IMAGE_FAMILY,
# BOOT_IMAGE_PROJECT and BOOT_IMAGE (the family's resource path).
# shellcheck disable=SC2034 # used by the scripts that source this file
boot_image() {
	if [[ ${CFG[USE_BAKED_IMAGE]} == true ]]; then
		BOOT_IMAGE_FAMILY=${CFG[BAKED_IMAGE_FAMILY]}
		BOOT_IMAGE_PROJECT=${CFG[PROJECT_ID]}
	else
		BOOT_IMAGE_FAMILY=${CFG[IMAGE_FAMILY]}
		BOOT_IMAGE_PROJECT=${CFG[IMAGE_PROJECT]}
	fi
	BOOT_IMAGE="projects/$BOOT_IMAGE_PROJECT/global/images/family/$BOOT_IMAGE_FAMILY"
}
