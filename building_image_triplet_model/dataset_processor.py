"""``python -m building_image_triplet_model.dataset_processor``: old path of triplet-process."""

from building_image_triplet_model.cli import process as main

if __name__ == "__main__":
    raise SystemExit(main())
