# shellcheck shell=bash
# Running gcloud from gcp/provision.sh and gcp/batch_submit.sh. Every call goes through one of these, so that
# a dry run prints exactly what a real run would do, a look that fails for any reason but "not found" stops
# the script before it creates anything, and a rerun creates nothing that exists. Sourced by
# gcp/provision_common.sh, never run.
#
# - gc_run: a call that changes something (printed, not run, in a dry run); gc_run_retrying: the same,
#   retried while IAM catches up.
# - gc_look VAR args...: a read-only call; "not found" in a dry run, so it shows a first run.
# - gc_probe VAR args...: the same for steps that delete; "found" in a dry run, so it shows a full teardown.

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

# Lines of $1 contain a line that starts with $2 followed by a tab or the end of the line: the rows of a
# look's value(...) output.
has_row() {
	local rows=$1 want=$2 row
	while IFS= read -r row; do
		[[ $row == "$want" || $row == "$want"$'\t'* ]] && return 0
	done <<<"$rows"
	return 1
}
