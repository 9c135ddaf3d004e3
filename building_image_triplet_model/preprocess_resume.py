"""What is done and what remains, for a run of the processor: any time, read-only.

    python -m building_image_triplet_model.preprocess_resume --config config.yaml [--json] [--html FILE]

Works on an absent, partial, interrupted or running output and never changes a file (``--html`` writes
only the page it is asked for). Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import config as config_mod
from . import exit_codes, status
from .exit_codes import Exit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m building_image_triplet_model.preprocess_resume",
        description="Report what the processor has done and what remains (read-only).",
        epilog=exit_codes.help_table(exit_codes.STATUS_CODES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="the processor's YAML config")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--html", metavar="FILE", help="also write a one-page picture of the run (HTML with SVG)")
    args = ap.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return Exit.CONFIG
    report = status.collect(cfg)
    print(json.dumps(report, indent=1) if args.json else status.render(report))
    if args.html:
        from . import report_page

        print(f"wrote {report_page.write(cfg, report, args.html, args.config)}")
    return Exit.OK if report["complete"] else Exit.WORK_REMAINS


if __name__ == "__main__":
    raise SystemExit(main())
