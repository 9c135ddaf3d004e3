"""The VM side of the bootstrap, in Python: settings, phases and their markers, checkpoints, the job.

``gcp/scripts/startup_preprocess.sh`` keeps what bash is right for (fetching the repository, apt and the
driver, disks, uv) and calls ``python -m building_image_triplet_model.vm <command>`` for the rest. The
modules a step runs before ``uv sync`` (settings, phases, gpu_stack) use the standard library only, so
Debian's own python3 runs them.
"""
