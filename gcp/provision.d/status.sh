# shellcheck shell=bash
# `provision.sh status`: what an operator checks during a run, read-only: the VM or group, the baked image,
# the run's phase markers in the bucket and the preemptions so far. Sourced by gcp/provision.sh, never run.

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
	if [[ ${CFG[USE_BAKED_IMAGE]} == true ]]; then
		if gc_look out compute images describe-from-family "${CFG[BAKED_IMAGE_FAMILY]}" "${P[@]}" \
			--format='value(name,creationTimestamp)'; then
			printf 'image family %s: %s\n' "${CFG[BAKED_IMAGE_FAMILY]}" "$out"
		else
			printf 'image family %s: no image (run provision.sh image)\n' "${CFG[BAKED_IMAGE_FAMILY]}"
		fi
	fi

	local listing="" url body="" phase
	local urls=()
	if gc_look listing storage ls "$RUN_CKPT_URI/state/"; then
		while IFS= read -r url; do [[ $url == *.json ]] && urls+=("$url"); done <<<"$listing"
	elif ((DRY_RUN)); then
		# The job's phases, from the one list (building_image_triplet_model/vm/phases.py).
		while IFS= read -r phase; do
			[[ -n $phase ]] && urls+=("$RUN_CKPT_URI/state/$phase.json")
		done < <(sysvm vm.phases)
	fi
	((${#urls[@]})) || printf 'markers: none yet under %s/state/\n' "$RUN_CKPT_URI"
	for url in "${urls[@]}"; do
		if gc_look body storage cat "$url"; then
			printf 'marker %s: %s\n' "$(basename "$url" .json)" "$(tr -d '\n' <<<"$body")"
		fi
	done

	# The engine's latest progress line, from the newest event log the VM pushed (every PUSH_INTERVAL_MIN).
	local logs="" newest="" events="" progress=""
	if gc_look logs storage ls "$RUN_CKPT_URI/logs/"; then
		newest=$(grep -E '\.jsonl$' <<<"$logs" | sort | tail -n 1) || newest=""
	fi
	if [[ -n $newest ]] && gc_look events storage cat "$newest"; then
		progress=$(grep -F '"event": "progress"' <<<"$events" | tail -n 1) ||
			progress=$(grep -F '"event":"progress"' <<<"$events" | tail -n 1) || progress=""
	fi
	printf 'latest progress (pushed every %s min): %s\n' "${CFG[PUSH_INTERVAL_MIN]}" "${progress:-none yet}"

	local ops="" count=0 line
	gc_look ops compute operations list "${P[@]}" --zones="$ZONE" \
		--filter="operationType=compute.instances.preempted AND targetLink~/instances/${CFG[VM_NAME]}" \
		--format='value(insertTime)' || true
	while IFS= read -r line; do [[ -n $line ]] && count=$((count + 1)); done <<<"$ops"
	printf 'preemptions recorded by Compute Engine (operations kept for a limited time): %d\n' "$count"
}
