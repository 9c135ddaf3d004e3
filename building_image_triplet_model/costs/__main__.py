"""``python -m building_image_triplet_model.costs``: ``triplet-costs`` (costs/model.py)."""

import sys

from building_image_triplet_model.costs.model import main

sys.exit(main())
