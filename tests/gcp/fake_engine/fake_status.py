"""Stand-in for preprocess_resume: exit 0 when the artifact exists, 10 otherwise; --json prints a report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = Path(yaml.safe_load(Path(args.config).read_text())["data"]["hdf5_path"])
    done = out.exists()
    print(json.dumps({"complete": done}) if args.json else f"complete: {done}")
    return 0 if done else 10


if __name__ == "__main__":
    sys.exit(main())
