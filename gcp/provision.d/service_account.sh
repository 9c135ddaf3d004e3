# shellcheck shell=bash
# `provision.sh service-account`: the account the VMs run as, with no key file and no role beyond what the run
# needs, and its removal (`teardown --delete-service-account`). One file for both, so that a teardown removes
# exactly what setup grants. Sourced by gcp/provision.sh, never run.

PROJECT_ROLES=(roles/logging.logWriter roles/monitoring.metricWriter)
SELF_STOP_PERMISSIONS=compute.instances.get,compute.instances.stop,compute.instances.delete,compute.instanceGroupManagers.get,compute.instanceGroupManagers.update,compute.zoneOperations.get

# The VM's roles on the buckets: bucket-level bindings only (no project-wide Storage role).
# - raw, the archive mirror: read archives and add new ones, never delete. objectCreator cannot replace an
#   existing object either (overwriting needs storage.objects.delete), so a mirrored archive is write-once.
# - processed: checkpoints, markers, logs and the artifact are rewritten in place, and OVERWRITING an object
#   needs storage.objects.delete as well as .create. roles/storage.objectUser: read, create, overwrite and
#   delete objects; unlike objectAdmin, no permission to change the IAM policy of objects or managed folders.
RAW_BUCKET_ROLES=(roles/storage.objectViewer roles/storage.objectCreator)
PROCESSED_BUCKET_ROLES=(roles/storage.objectUser)
# Granted on both buckets by earlier versions of this script: removed (for this account only) where found.
STALE_BUCKET_ROLES=(roles/storage.objectAdmin)

bucket_roles() { # bucket -> the roles the VM's account holds on it, one per line
	if [[ $1 == "${CFG[RAW_BUCKET]}" ]]; then
		printf '%s\n' "${RAW_BUCKET_ROLES[@]}"
	else
		printf '%s\n' "${PROCESSED_BUCKET_ROLES[@]}"
	fi
}

# bucket_policy VAR BUCKET [LOOK]: 0 when the bucket exists; its role<TAB>member rows in VAR. LOOK is gc_look
# (default) or gc_probe, for a teardown's dry run to show every removal.
bucket_policy() {
	"${3:-gc_look}" "$1" storage buckets get-iam-policy "gs://$2" "${P[@]}" \
		--flatten='bindings[].members' --format='value(bindings.role,bindings.members)'
}

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

	local bucket role roles=()
	for bucket in "${CFG[RAW_BUCKET]}" "${CFG[PROCESSED_BUCKET]}"; do
		if ! bucket_policy policy "$bucket" && ((!DRY_RUN)); then
			die "bucket gs://$bucket does not exist: run 'provision.sh buckets' first"
		fi
		mapfile -t roles < <(bucket_roles "$bucket")
		for role in "${roles[@]}"; do
			if ! has_row "$policy" "$role"$'\t'"$SA_MEMBER"; then
				gc_run_retrying storage buckets add-iam-policy-binding "gs://$bucket" "${P[@]}" \
					--member="$SA_MEMBER" --role="$role"
			fi
		done
		for role in "${STALE_BUCKET_ROLES[@]}"; do
			if has_row "$policy" "$role"$'\t'"$SA_MEMBER"; then
				note "removing $role on gs://$bucket (an earlier version of this script granted it)"
				gc_run storage buckets remove-iam-policy-binding "gs://$bucket" "${P[@]}" \
					--member="$SA_MEMBER" --role="$role"
			fi
		done
	done

	# Log and metric writer: these roles exist only at project level.
	project_policy policy
	for role in "${PROJECT_ROLES[@]}"; do
		grant_project_role "$policy" "$role"
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

# Removes exactly the bindings this project's scripts give the account (and the roles of earlier versions),
# then the self-stop role and the account. A dry run shows every removal a complete setup needs.
teardown_service_account() {
	# shellcheck disable=SC2034 # out: what the look found, unused: only whether it exists counts here
	local policy="" role bucket out="" roles=()
	project_policy policy gc_probe
	for role in "${PROJECT_ROLES[@]}" "$SELF_STOP_ROLE_NAME" "$BATCH_AGENT_ROLE"; do
		if ((DRY_RUN)) || has_row "$policy" "$role"$'\t'"$SA_MEMBER"; then
			gc_run projects remove-iam-policy-binding "$PROJECT" --member="$SA_MEMBER" --role="$role" --all
		fi
	done
	if ((!DELETE_BUCKETS)); then
		for bucket in "${CFG[RAW_BUCKET]}" "${CFG[PROCESSED_BUCKET]}"; do
			bucket_policy policy "$bucket" gc_probe || continue
			mapfile -t roles < <(bucket_roles "$bucket")
			for role in "${roles[@]}" "${STALE_BUCKET_ROLES[@]}"; do
				if has_row "$policy" "$role"$'\t'"$SA_MEMBER" || { ((DRY_RUN)) && [[ " ${roles[*]} " == *" $role "* ]]; }; then
					gc_run storage buckets remove-iam-policy-binding "gs://$bucket" "${P[@]}" \
						--member="$SA_MEMBER" --role="$role"
				fi
			done
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
