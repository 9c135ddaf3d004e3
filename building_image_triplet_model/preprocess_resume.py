"""``python -m building_image_triplet_model.preprocess_resume``: old path of triplet-status."""

from building_image_triplet_model.cli import status as main

if __name__ == "__main__":
    raise SystemExit(main())
