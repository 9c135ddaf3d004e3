# shellcheck shell=bash
# `provision.sh disks` and `provision.sh move-zone`: the two data disks, which outlive every VM (they hold
# the mirrored archives and the run's work), and their move to another zone when this one has no Spot
# capacity left. Sourced by gcp/provision.sh, never run.

ensure_disk() { # name size-gb zone
	local name=$1 gb=$2 zone=$3 found=""
	if gc_look found compute disks describe "$name" --project="$PROJECT" --zone="$zone" --format='value(sizeGb,type.basename())'; then
		[[ $found == "$gb"$'\t'"${CFG[DISK_TYPE]}" ]] || note "disk $name exists as '$found' (size GB, type); left as it is"
		return 0
	fi
	gc_run compute disks create "$name" --project="$PROJECT" --zone="$zone" --size="${gb}GB" \
		--type="${CFG[DISK_TYPE]}" --labels="$LABELS"
}

# shellcheck disable=SC2153 # ZONE: set by gcp/provision.sh from the settings, not a misspelt zone
do_disks() {
	step "disks"
	ensure_disk "${CFG[RAW_DISK]}" "${CFG[RAW_DISK_GB]}" "$ZONE"
	ensure_disk "${CFG[WORK_DISK]}" "${CFG[WORK_DISK_GB]}" "$ZONE"
}

do_move_zone() {
	local target=${ARGS[0]:-}
	[[ $target =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "move-zone needs the target zone, e.g. move-zone us-central1-b"
	[[ $target != "$ZONE" ]] || die "the disks are already in $ZONE"
	step "move-zone $ZONE -> $target"
	# shellcheck disable=SC2034 # out: what the look found, unused: only whether it exists counts here
	local out=""
	if gc_look out compute instance-groups managed describe "${CFG[MIG_NAME]}" "${PZ[@]}" --format='value(name)' ||
		gc_look out compute instances describe "${CFG[VM_NAME]}" "${PZ[@]}" --format='value(name)'; then
		die "a VM or group in $ZONE still uses the disks: run 'provision.sh teardown' first (disks are kept)"
	fi
	local disk gb snap
	for disk in "${CFG[RAW_DISK]}:${CFG[RAW_DISK_GB]}" "${CFG[WORK_DISK]}:${CFG[WORK_DISK_GB]}"; do
		gb=${disk#*:}
		disk=${disk%%:*}
		snap="$disk-to-$target"
		if ! gc_look out compute snapshots describe "$snap" "${P[@]}" --format='value(status)'; then
			gc_run compute disks snapshot "$disk" "${PZ[@]}" --snapshot-names="$snap" --storage-location="$REGION"
		fi
		if ! gc_look out compute disks describe "$disk" --project="$PROJECT" --zone="$target" --format='value(name)'; then
			gc_run compute disks create "$disk" --project="$PROJECT" --zone="$target" --source-snapshot="$snap" \
				--size="${gb}GB" --type="${CFG[DISK_TYPE]}" --labels="$LABELS"
		fi
		if ((DELETE_OLD)); then
			if gc_probe out compute disks describe "$disk" "${PZ[@]}" --format='value(name)'; then
				gc_run compute disks delete "$disk" "${PZ[@]}" --quiet
			fi
			if gc_probe out compute snapshots describe "$snap" "${P[@]}" --format='value(status)'; then
				gc_run compute snapshots delete "$snap" "${P[@]}" --quiet
			fi
		fi
	done
	note "next: set ZONE=$target in the config, then run: provision.sh service-account ${CFG[DEPLOY_MODE]}"
}
