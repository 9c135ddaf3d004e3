# shellcheck shell=bash
# The command line of gcp/provision.sh and gcp/batch_submit.sh: one parser for both, so that --dry-run,
# --config, --set and --help mean the same in each. Sourced by gcp/provision_common.sh, never run.
#
#   SCRIPT [--dry-run] [--config FILE] [--set KEY=VALUE]... SUBCOMMAND [ARG...] [options]
#
# Before calling parse_args a script names its own options: OPT_FLAG[--name]=VAR (VAR becomes 1) and
# OPT_VALUE[--name]=VAR (VAR takes the next word, or what follows '='), and ARGS_MAX, the number of words
# allowed after the subcommand. Options may come anywhere. The variables are the scripts' own names, never
# words from the command line.

declare -A OPT_FLAG=() OPT_VALUE=()
ARGS_MAX=0
DRY_RUN=0 # only --dry-run sets it (never the environment: it is used in arithmetic)
CONFIG_FILE=$PROVISION_DIR/provision.conf
SETS=()
SUBCOMMAND=""
ARGS=()

# The comment block at the top of the script that was run, up to `set -Eeuo pipefail`.
usage() { sed -n '2,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[-1]}"; }

# shellcheck disable=SC2034 # CONFIG_FILE, SETS, ARGS: read by the scripts that source this file
parse_args() {
	local opt
	while (($#)); do
		case $1 in
		--dry-run) DRY_RUN=1 ;;
		--config | --set)
			(($# >= 2)) || die "$1 needs a value (see --help)"
			if [[ $1 == --config ]]; then CONFIG_FILE=$2; else SETS+=("$2"); fi
			shift
			;;
		--config=*) CONFIG_FILE=${1#--config=} ;;
		--set=*) SETS+=("${1#--set=}") ;;
		-h | --help)
			usage
			exit 0
			;;
		--*=*)
			opt=${1%%=*}
			[[ -v "OPT_VALUE[$opt]" ]] || die "unknown option: $1 (see --help)"
			printf -v "${OPT_VALUE[$opt]}" '%s' "${1#*=}"
			;;
		-*)
			if [[ -v "OPT_FLAG[$1]" ]]; then
				printf -v "${OPT_FLAG[$1]}" '%s' 1
			elif [[ -v "OPT_VALUE[$1]" ]]; then
				(($# >= 2)) || die "$1 needs a value (see --help)"
				printf -v "${OPT_VALUE[$1]}" '%s' "$2"
				shift
			else
				die "unknown option: $1 (see --help)"
			fi
			;;
		*)
			if [[ -z $SUBCOMMAND ]]; then SUBCOMMAND=$1; else ARGS+=("$1"); fi
			;;
		esac
		shift
	done
	if [[ -z $SUBCOMMAND ]]; then
		usage >&2
		exit 2
	fi
	((${#ARGS[@]} <= ARGS_MAX)) || die "too many arguments after '$SUBCOMMAND': ${ARGS[*]} (see --help)"
}
