# VM bootstrap targets (docs/bootstrap.md), included by the Makefile. The same scripts run on the VM.

GCP_SCRIPTS := gcp/scripts
GCP_MANIFEST ?= data/downloads/raw_archives.txt
GCP_RAW_DIR ?= build/raw
GCP_EXTRACT_DIR ?= build/extracted
GCP_CONFIG ?= configs/demo.yaml

# The local dry run: sample archives served over HTTP on 127.0.0.1 -> aria2c downloads them one at a time
# while the engine embeds each archive as it arrives -> plan, KNN, artifact -> status; checkpoints go to a
# local folder standing in for the bucket. Everything lives under DRY_RUN_DIR.
DRY_RUN_DIR ?= build/dry-run
DRY_RUN_CONFIG ?= configs/demo.yaml
DRY_RUN_ARCHIVES ?= build/sample_archives
DRY_RUN_RATE ?= 1000000
DRY_RUN_PYTHON ?= $(CURDIR)/.venv/bin/python
DRY_RUN_ENV = TRIPLET_SKIP_SYSTEM=1 TRIPLET_SKIP_DISKS=1 TRIPLET_SKIP_REPO=1 TRIPLET_SKIP_UV_SYNC=1 \
	TRIPLET_METADATA=off TRIPLET_RUN_MODE=direct TRIPLET_REPO_DIR=$(CURDIR) TRIPLET_PYTHON=$(DRY_RUN_PYTHON) \
	TRIPLET_MOUNT_RAW=$(CURDIR)/$(DRY_RUN_DIR)/raw TRIPLET_MOUNT_WORK=$(CURDIR)/$(DRY_RUN_DIR)/work \
	TRIPLET_RUN_DIR=$(CURDIR)/$(DRY_RUN_DIR)/run TRIPLET_RUN_ID=dry-run \
	TRIPLET_CHECKPOINT_URI=$(CURDIR)/$(DRY_RUN_DIR)/bucket TRIPLET_MANIFEST_URI=$(CURDIR)/$(DRY_RUN_DIR)/manifest.txt \
	TRIPLET_PREPROCESS_CONFIG_PATH=$(DRY_RUN_CONFIG) TRIPLET_PUSH_INTERVAL_S=10 TRIPLET_ARIA2_JOBS=1
# The bootstrap's steps that a dry run has (system, disks, repo, uv and the Ops Agent are the VM's own).
DRY_RUN_STEPS := config preflight restore start
# The job's "done" marker (TRIPLET_MOUNT_WORK's state/, vm/paths.py): a run complete before this one.
DRY_RUN_DONE := $(DRY_RUN_DIR)/work/state/done.json

.PHONY: gcp-download gcp-extract gcp-preprocess dry-run dry-run-status dry-run-clean

gcp-download: setup ## download GCP_MANIFEST's archives into GCP_RAW_DIR (aria2c, resumable; GCP_MANIFEST may be gs://)
	bash $(GCP_SCRIPTS)/download_archives.sh --manifest $(GCP_MANIFEST) --dir $(GCP_RAW_DIR)

gcp-extract: ## extract GCP_RAW_DIR's archives into GCP_EXTRACT_DIR (members checked, resumable)
	bash $(GCP_SCRIPTS)/extract_archives.sh --raw-dir $(GCP_RAW_DIR) --extract-dir $(GCP_EXTRACT_DIR)

gcp-preprocess: setup ## run the processor on GCP_CONFIG, then print its status report
	rc=0; $(RUN) triplet-process --config $(GCP_CONFIG) || rc=$$?; \
	$(RUN) triplet-status --config $(GCP_CONFIG) || true; exit $$rc

# Made again when the generator changes (the planted items are what the demo's report is checked against).
$(DRY_RUN_ARCHIVES)/0009.tar: tools/sample_data.py
	rm -rf $(DRY_RUN_ARCHIVES)
	$(RUN) python -m tools.sample_data --out $(DRY_RUN_ARCHIVES) --archives 3 --bad

# A run complete before this one says so in one line (the job's), without the report: `make dry-run-status`.
dry-run: setup $(DRY_RUN_ARCHIVES)/0009.tar ## the VM bootstrap end to end on sample archives (aria2c from 127.0.0.1)
	@command -v aria2c >/dev/null 2>&1 || { echo "aria2c is not installed: make sys-deps"; exit 1; }
	@mkdir -p $(DRY_RUN_DIR) && rm -f $(DRY_RUN_DIR)/server.url
	@echo "dry run: disks, bucket and logs under $(DRY_RUN_DIR)/ (TRIPLET_* settings: DRY_RUN_ENV in gcp/gcp.mk)"
	@$(RUN) python -m tools.fileserver --root $(DRY_RUN_ARCHIVES) \
		--port-file $(DRY_RUN_DIR)/server.url --rate $(DRY_RUN_RATE) & server=$$!; trap 'kill $$server' EXIT; \
	for _ in $$(seq 100); do [[ -s $(DRY_RUN_DIR)/server.url ]] && break; sleep 0.1; done; \
	url=$$(cat $(DRY_RUN_DIR)/server.url); \
	for f in $(DRY_RUN_ARCHIVES)/*.tar; do n=$$(basename $$f); printf '%s/%s\n\tout=dataset_unaligned/%s\n' "$$url" "$$n" "$$n"; \
	done > $(DRY_RUN_DIR)/manifest.txt; \
	done_before=$$([[ -f $(DRY_RUN_DONE) ]] && echo 1 || true); \
	$(DRY_RUN_ENV) bash $(GCP_SCRIPTS)/startup_preprocess.sh $(DRY_RUN_STEPS); \
	[[ -n "$$done_before" ]] || $(DRY_RUN_ENV) bash $(GCP_SCRIPTS)/startup_preprocess.sh status

dry-run-status: ## the dry run's phase markers and the engine's status report
	@$(DRY_RUN_ENV) bash $(GCP_SCRIPTS)/startup_preprocess.sh status

dry-run-clean: ## forget the dry run (its disks, bucket and state under DRY_RUN_DIR)
	rm -rf $(DRY_RUN_DIR)
