# shellcheck shell=bash
# Helpers shared by gcp/provision.sh and gcp/batch_submit.sh: the configuration file reader, the gcloud
# runners (dry run, look-before-create) and logging. Sourced, never run on its own.
#
# Configuration: gcp/provision.conf holds KEY=VALUE lines. It is READ, line by line, and every value is
# checked against the pattern of its key before use: nothing in it is sourced, evaluated or expanded. An
# unknown key, a missing key or a value that does not match its pattern stops the script.

PROVISION_TS_FMT='%Y-%m-%dT%H:%M:%SZ'

log() { printf '%s %s\n' "$(date -u +"$PROVISION_TS_FMT")" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 2
}

# ---------------------------------------------------------------------------------------------------------
# Configuration

# Type of every key the file must define. The values live in the file only (one source of truth).
declare -A CFG_TYPE=(
	[PROJECT_ID]=project
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
	[REPO_URL]=url
	[REPO_REF]=ref
	[PREPROCESS_CONFIG]=path
	[ON_DONE]=ondone
	[CHECKPOINT_INTERVAL_MIN]=int
	[INSTALL_OPS_AGENT]=bool
	[BATCH_LOCATION]=region
	[BATCH_ALLOWED_LOCATIONS]=locations
	[BATCH_JOB_PREFIX]=name
	[BATCH_TASK_COUNT]=int
	[BATCH_PARALLELISM]=int
	[BATCH_MAX_RETRY_COUNT]=retry
	[BATCH_RETRY_EXIT_CODES]=intlist
	[BATCH_BOOT_IMAGE]=image
	[BATCH_RAW_DISK_GB]=int
	[BATCH_WORK_DISK_GB]=int
	[BATCH_INSTALL_GPU_DRIVERS]=bool
	[BATCH_MERGE_MACHINE_TYPE]=name
	[BATCH_MERGE_PROVISIONING_MODEL]=provisioning
	[BATCH_MERGE_WORK_DISK_GB]=int
)

declare -A CFG=()

cfg_check_value() { # key value -> 0 when the value matches the key's pattern
	local key=$1 value=$2
	case ${CFG_TYPE[$key]} in
	project) [[ $value =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] ;;
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
	runid) [[ $value =~ ^[a-z0-9][a-z0-9-]{0,38}[a-z0-9]$ ]] ;;
	gsuri) [[ $value =~ ^gs://[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9](/[A-Za-z0-9_.-]+)*/?$ ]] ;;
	objpath) [[ $value =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] ;;
	path) [[ $value =~ ^[A-Za-z0-9_./-]+$ && $value != *..* ]] ;;
	optpath) [[ -z $value || ($value =~ ^[A-Za-z0-9_./-]+$ && $value != *..*) ]] ;;
	url) [[ $value =~ ^(https://|ssh://|git@|file:///)[A-Za-z0-9_.:/@~+-]+$ ]] ;;
	ref) [[ $value =~ ^[A-Za-z0-9_./-]{1,100}$ && $value != *..* ]] ;;
	image) [[ $value =~ ^[a-z][a-z0-9-]*(/[a-z0-9-]+)*$ ]] ;;
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

cfg() { printf '%s' "${CFG[$1]}"; }

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
}

# cfg_setup FILE [KEY=VALUE...]: the settings of one invocation: the file, then the --set overrides, then
# every check. A real run (not --dry-run) also refuses the placeholder values of the committed file.
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
		[[ ${CFG[PROJECT_ID]} != your-project-id ]] || die "set PROJECT_ID in $file (or --set PROJECT_ID=...)"
		[[ ${CFG[REPO_URL]} != *your-org* ]] || die "set REPO_URL in $file (or --set REPO_URL=...)"
	fi
}

# ---------------------------------------------------------------------------------------------------------
# Printing commands and running gcloud

# Prints its arguments as ONE line that a POSIX shell reads back as the same words.
shell_quote() {
	local out="" a sq="'"
	for a in "$@"; do
		if [[ -n $a && $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
			out+="$a "
		else
			out+="'${a//$sq/$sq\\$sq$sq}' "
		fi
	done
	printf '%s' "${out% }"
}

DRY_RUN=${DRY_RUN:-0}
GCLOUD_BIN=${GCLOUD_BIN:-gcloud}

step() {
	if ((DRY_RUN)); then printf '\n# step: %s\n' "$*"; else log "== $*"; fi
}

note() {
	if ((DRY_RUN)); then printf '# %s\n' "$*"; else log "$*"; fi
}

# A gcloud call that changes something. In a dry run it is printed (as a shell line) and not run.
gc_run() {
	if ((DRY_RUN)); then
		printf '%s\n' "$(shell_quote gcloud "$@")"
		return 0
	fi
	log "run: $(shell_quote gcloud "$@")"
	"$GCLOUD_BIN" "$@"
}

# gc_run, retried: for calls that can fail for a short while after a create they depend on (IAM is eventually
# consistent: a binding for a service account created seconds ago can fail with "does not exist").
# PROVISION_RETRY_SLEEP_S: the first wait (doubled each time; default 5 s), PROVISION_RETRIES: attempts (5).
gc_run_retrying() {
	local attempt=1 rc wait=${PROVISION_RETRY_SLEEP_S:-5} max=${PROVISION_RETRIES:-5}
	[[ $wait =~ ^[0-9]{1,3}$ && $max =~ ^[1-9][0-9]?$ ]] || die "PROVISION_RETRY_SLEEP_S/PROVISION_RETRIES must be small numbers"
	while :; do
		rc=0
		gc_run "$@" || rc=$?
		((rc == 0)) && return 0
		((attempt < max)) || return "$rc"
		log "attempt $attempt/$max failed (exit $rc); retrying in ${wait}s"
		sleep "$wait"
		attempt=$((attempt + 1))
		wait=$((wait * 2))
	done
}

# A read-only gcloud call: gc_look VAR args...
# Stores the command's standard output in VAR and returns 0 when the resource exists, 1 when gcloud says
# it does not (NOT_FOUND / 404). Any other failure (permission, network, quota) stops the script: nothing
# is ever created because a look failed. In a dry run the call is printed as a '# look:' comment and
# treated as "not found", so the dry run shows every command a first run in an empty project makes.
gc_look() {
	# Locals carry a __gl_ prefix: printf -v must assign the CALLER's variable, not a local of the same name.
	local __gl_var=$1
	shift
	printf -v "$__gl_var" '%s' ""
	if ((DRY_RUN)); then
		printf '# look: %s\n' "$(shell_quote gcloud "$@")"
		dry_run_assumption "$__gl_var"
		return
	fi
	local __gl_out __gl_err __gl_rc=0
	__gl_out=$(mktemp)
	__gl_err=$(mktemp)
	"$GCLOUD_BIN" "$@" >"$__gl_out" 2>"$__gl_err" || __gl_rc=$?
	if ((__gl_rc == 0)); then
		printf -v "$__gl_var" '%s' "$(<"$__gl_out")"
		rm -f "$__gl_out" "$__gl_err"
		return 0
	fi
	if grep -qiE 'not found|NOT_FOUND|404|does not exist|matched no objects' "$__gl_err"; then
		rm -f "$__gl_out" "$__gl_err"
		return 1
	fi
	cat "$__gl_err" >&2
	rm -f "$__gl_out" "$__gl_err"
	die "gcloud failed (exit $__gl_rc): $(shell_quote gcloud "$@")"
}

# Like gc_look, for steps that delete: in a dry run the resource is assumed to EXIST (output empty), so the
# dry run prints the delete commands a teardown of a complete setup makes.
gc_probe() {
	if ((DRY_RUN)); then
		local __gp_var=$1
		shift
		printf '# look: %s\n' "$(shell_quote gcloud "$@")"
		dry_run_assumption "$__gp_var" || true
		return 0
	fi
	gc_look "$@"
}

# What a look finds in a dry run. Default: nothing (a first run in an empty project). For tests and for
# previewing a rerun, PROVISION_DRY_RUN_LOOK=exists:TEXT makes every look succeed and print TEXT.
dry_run_assumption() {
	printf -v "$1" '%s' ""
	case ${PROVISION_DRY_RUN_LOOK:-missing} in
	missing) return 1 ;;
	exists:*)
		printf -v "$1" '%s' "${PROVISION_DRY_RUN_LOOK#exists:}"
		return 0
		;;
	*) die "PROVISION_DRY_RUN_LOOK must be 'missing' or 'exists:TEXT'" ;;
	esac
}

# Uploads a local file unless the object already holds the same bytes (MD5 compared), so a second run
# sends nothing.
local_md5() {
	local sum
	if command -v md5sum >/dev/null 2>&1; then
		sum=$(md5sum <"$1")
		printf '%s' "${sum%% *}"
	elif command -v md5 >/dev/null 2>&1; then
		md5 -q "$1"
	else
		"$GCLOUD_BIN" storage hash "$1" --hex --skip-crc32c --format='value(md5_hash)'
	fi
}

upload_if_changed() { # local-file destination-uri
	local src=$1 dst=$2 remote=""
	if ((DRY_RUN)); then
		gc_look remote storage hash "$dst" --hex --skip-crc32c --format='value(md5_hash)' || true
		gc_run storage cp "$src" "$dst"
		return 0
	fi
	[[ -f $src ]] || die "missing file to upload: $src"
	if gc_look remote storage hash "$dst" --hex --skip-crc32c --format='value(md5_hash)' &&
		[[ $remote == "$(local_md5 "$src")" ]]; then
		return 0
	fi
	gc_run storage cp "$src" "$dst"
}

# Fingerprint of text (sha256, 12 hex digits): names the immutable instance template and labels buckets.
fingerprint() {
	local sum
	if command -v sha256sum >/dev/null 2>&1; then
		sum=$(printf '%s' "$1" | sha256sum)
	else
		sum=$(printf '%s' "$1" | shasum -a 256)
	fi
	printf '%s' "${sum:0:12}"
}

file_fingerprint() {
	[[ -f $1 ]] || die "file not found: $1"
	fingerprint "$(cat "$1")"
}
