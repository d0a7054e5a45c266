"""Command line: ``python -m dd.synth OUT_DIR --count N --seed S [--width W --height H]``.

Exists so a data set for training or a smoke test can be produced without writing code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dd.synth.scenes import SEED_STRIDE, write_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dd.synth",
        description="Write synthetic top-down RGB-D depalletizing scenes with COCO instance annotations.",
    )
    parser.add_argument("out_dir", type=Path, help="output folder (color/, depth/, annotations.json)")
    parser.add_argument("--count", type=int, default=100, help="number of scenes (default 100)")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"data set seed; scene i uses seed*{SEED_STRIDE}+i (default 0)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    args = parser.parse_args(argv)
    if not 0 <= args.count <= SEED_STRIDE:
        parser.error(f"--count must be in [0, {SEED_STRIDE}]")
    if args.width < 64 or args.height < 64:
        parser.error("--width and --height must be at least 64")
    start = time.perf_counter()
    path = write_dataset(args.out_dir, args.count, args.seed, args.width, args.height)
    print(f"wrote {args.count} scenes to {args.out_dir} ({path.name}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
