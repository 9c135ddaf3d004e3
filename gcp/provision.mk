# Provisioning, Cloud Batch and cost targets (docs/preprocessing_gcp.md, docs/costs.md). Included by the Makefile.
COSTS_ARGS ?=
PROVISION_ARGS ?=

.PHONY: costs costs-docs provision-check provision-test

costs: ## estimate a run's cost (COSTS_ARGS="--images 2e7 --images-per-s 180 [--workers 8]")
	$(RUN) triplet-costs $(COSTS_ARGS)

costs-docs: ## refresh the generated tables of docs/costs.md from building_image_triplet_model/costs/model.py
	$(RUN) triplet-costs --update-doc docs/costs.md

provision-check: ## print every gcloud command of a first `all` (nothing is contacted)
	gcp/provision.sh --dry-run $(PROVISION_ARGS) all
	gcp/batch_submit.sh --dry-run $(PROVISION_ARGS) submit

provision-test: ## the provisioning and cost tests (real gcloud parser when gcloud is installed)
	$(RUN) pytest -q tests/provision tests/test_costs.py
