# shellcheck shell=bash
# What gcp/provision.sh and gcp/batch_submit.sh share, in the one file both source: the log format, the
# command line, the settings, the gcloud runners and the project-level steps. Each concern is a file of
# gcp/provision.d/; this one only loads them, in an order where every top-level line finds what it uses.
# Sourced, never run on its own.

PROVISION_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROVISION_REPO=$(cd "$PROVISION_DIR/.." && pwd)

# The project's one log format (log, warn, die; "<UTC time> <tag>[<pid>]: message" on stderr) and `sysvm`,
# the standard-library Python of building_image_triplet_model/vm/. Provisioning exits 2 on every error.
# shellcheck source=gcp/scripts/lib.sh
source "$PROVISION_DIR/scripts/lib.sh"
TRIPLET_DIE_CODE=2

# shellcheck source=gcp/provision.d/cli.sh
source "$PROVISION_DIR/provision.d/cli.sh"
# shellcheck source=gcp/provision.d/config.sh
source "$PROVISION_DIR/provision.d/config.sh"
# shellcheck source=gcp/provision.d/gcloud.sh
source "$PROVISION_DIR/provision.d/gcloud.sh"
# shellcheck source=gcp/provision.d/digest.sh
source "$PROVISION_DIR/provision.d/digest.sh"
# shellcheck source=gcp/provision.d/project.sh
source "$PROVISION_DIR/provision.d/project.sh"
