"""Fixtures of the provisioning tests (the helpers themselves are in provision_helpers.py)."""

from provision_helpers import example_remote, fake_cloud, gcloud_lib, run_files

__all__ = ["example_remote", "fake_cloud", "gcloud_lib", "run_files"]
