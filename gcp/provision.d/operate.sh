# shellcheck shell=bash
# The operator's steps around a run (docs/preprocessing_gcp.md, "The first day"): `mirror` (the archives into
# the raw bucket), `weights` (the hub weights into the processed bucket, once), `smoke-benchmark` (the GPU
# benchmark on the run's own L4) and `fetch` (the finished artifact home). The first two and the last run
# the project's Python here (google-cloud-storage with your application-default credentials:
# `gcloud auth application-default login`); the benchmark runs on the VM over `gcloud compute ssh`.
# Sourced by gcp/provision.sh, never run.

# The raw bucket's folder for the archives, and where the mirror's manifest (entries read from there) goes.
MIRROR_PREFIX=archives
# Where the smoke benchmark's figures go in the bucket, and where the cost model reads them here
# (building_image_triplet_model/costs/gpu_rate.py).
BENCH_OBJECT=benchmarks/gpu.json
BENCH_LOCAL=benchmarks/results/gpu.json

# The project's Python: the checkout's environment (`make setup`), else `uv run`.
run_python() { # module args...
	local py=(uv run --frozen --project "$PROVISION_REPO" python)
	[[ -x $PROVISION_REPO/.venv/bin/python ]] && py=("$PROVISION_REPO/.venv/bin/python")
	if ((DRY_RUN)); then
		printf '%s\n' "$(shell_quote "${py[@]}" -m "building_image_triplet_model.$1" "${@:2}")"
		return 0
	fi
	log "run: $(shell_quote "${py[@]}" -m "building_image_triplet_model.$1" "${@:2}")"
	(cd "$PROVISION_REPO" && "${py[@]}" -m "building_image_triplet_model.$1" "${@:2}")
}

require_bucket() { # bucket: stops (before anything runs) when it does not exist
	local out=""
	gc_look out storage buckets describe "gs://$1" "${P[@]}" --format='value(name)' && return 0
	((DRY_RUN)) || die "gs://$1 does not exist: run gcp/provision.sh buckets first"
}

do_mirror() {
	step "mirror"
	require_bucket "${CFG[RAW_BUCKET]}"
	local manifest mirrored
	manifest=$(repo_path "${CFG[MANIFEST_SOURCE]:-data/downloads/raw_archives.txt}")
	[[ -f $manifest ]] || ((DRY_RUN)) || die "MANIFEST_SOURCE $manifest does not exist"
	mirrored="${CFG[MANIFEST_URI]%.txt}.mirror.txt"
	run_python remote.mirror --manifest "$manifest" --to "gs://${CFG[RAW_BUCKET]}/$MIRROR_PREFIX" \
		--work "$PROVISION_REPO/build/mirror" --out-manifest "$PROVISION_REPO/build/mirror/manifest.mirror.txt" \
		--upload-manifest "$mirrored"
	note "to read the archives from the bucket, set MANIFEST_URI=$mirrored (gcp/provision.conf), then run template and mig (or batch_submit.sh submit)"
}

do_weights() {
	step "weights"
	require_bucket "${CFG[PROCESSED_BUCKET]}"
	run_python remote.weights --config "$(repo_path "${CFG[PREPROCESS_CONFIG]}")" --to "gs://${CFG[PROCESSED_BUCKET]}/weights"
}

# The group's VM (its name has a suffix) or the single VM.
run_vm_name() { # -> RUN_VM
	RUN_VM=${CFG[VM_NAME]}
	[[ ${CFG[DEPLOY_MODE]} == mig ]] || return 0
	local out=""
	gc_look out compute instance-groups managed list-instances "${CFG[MIG_NAME]}" "${PZ[@]}" \
		--format='value(instance.basename())' || true
	RUN_VM=${out%%$'\n'*}
	if [[ -z $RUN_VM ]]; then
		((DRY_RUN)) || die "the group ${CFG[MIG_NAME]} has no VM yet (gcp/provision.sh status)"
		RUN_VM=${CFG[VM_NAME]}-abcd
	fi
}

# benchmarks/gpu.py on the run's own L4, with configs/vm.yaml's settings: the job is stopped first (SIGTERM:
# the engine saves its progress and exits 75) so that the GPU is the benchmark's alone, and started again
# afterwards by running the startup script again (every finished phase is skipped; the engine resumes).
do_smoke_benchmark() {
	step "smoke-benchmark"
	run_vm_name
	local object="$RUN_CKPT_URI/$BENCH_OBJECT"
	local remote="set -e; sudo systemctl stop triplet-preprocess.service 2>/dev/null || true; cd /mnt/work/repo; "
	remote+="sudo .venv/bin/python benchmarks/gpu.py --out /mnt/work/bench --budget-s 900; "
	remote+="sudo .venv/bin/triplet-sync cp /mnt/work/bench/gpu.json $object; "
	remote+="sudo google_metadata_script_runner startup"
	gc_run compute ssh "$RUN_VM" "${PZ[@]}" --command="$remote"
	gc_run storage cp "$object" "$(repo_path "$BENCH_LOCAL")" "${P[@]}"
	note "the cost model reads $BENCH_LOCAL (labelled measured): python -m building_image_triplet_model.costs; make costs-docs"
}

do_fetch() {
	step "fetch"
	require_bucket "${CFG[PROCESSED_BUCKET]}"
	run_python remote.fetch_result "$RUN_CKPT_URI" "${ARGS[0]:-$PROVISION_REPO/build/results/${CFG[RUN_ID]}}"
}
