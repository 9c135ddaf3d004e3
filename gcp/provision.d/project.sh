# shellcheck shell=bash
# What gcp/provision.sh and gcp/batch_submit.sh both set on the project itself: enabled APIs and the VM
# account's project-level roles. Sourced by gcp/provision_common.sh, never run.

# The project role Batch VMs report their state with (batch_submit.sh setup grants it, teardown removes it).
# shellcheck disable=SC2034 # used by the scripts that source this file
BATCH_AGENT_ROLE=roles/batch.agentReporter

enable_apis() { # api... -> enables, in one call, those not enabled yet
	local enabled="" api missing=()
	gc_look enabled services list --enabled --project="$PROJECT" --format='value(config.name)' || true
	for api in "$@"; do
		has_row "$enabled" "$api" || missing+=("$api")
	done
	if ((${#missing[@]})); then gc_run services enable "${missing[@]}" --project="$PROJECT"; fi
}

# project_policy VAR [LOOK]: the project's role<TAB>member<TAB>condition-title rows in VAR. LOOK is gc_look
# (default) or gc_probe, for a teardown's dry run to show every removal.
project_policy() {
	"${2:-gc_look}" "$1" projects get-iam-policy "$PROJECT" --flatten='bindings[].members' \
		--format='value(bindings.role,bindings.members,bindings.condition.title)' || true
}

# Binds a role to the VM's account, with no condition, unless the policy rows show that it holds it.
grant_project_role() { # policy-rows role
	if ! has_row "$1" "$2"$'\t'"$SA_MEMBER"; then
		gc_run_retrying projects add-iam-policy-binding "$PROJECT" --member="$SA_MEMBER" --role="$2" --condition=None
	fi
}
