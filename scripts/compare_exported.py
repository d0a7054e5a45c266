#!/usr/bin/env python3
"""An exported model folder's engine against its source model's engine, on dd.synth scenes: one table.

    python scripts/compare_exported.py SOURCE_FOLDER EXPORTED_FOLDER [--count 10] [--threshold T] [--device cpu]

Matching (tests/export_parity.py): same class and box IoU >= 0.9, in the reference's score order.
Prints the matched fraction, the largest box corner and score deviations, the smallest and mean mask
IoU, and the reference's confident detections (score >= threshold + 0.05) left unmatched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dd.config import load_model_config  # noqa: E402
from dd.synth.scenes import generate_scene  # noqa: E402
from dd.worker.engines import load_engine  # noqa: E402
from dd.worker.engines.base import EngineInput  # noqa: E402
from tests.export_parity import Parity, add  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source")
    ap.add_argument("exported")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--threshold", type=float, help="score threshold (default: the source model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    args = ap.parse_args()
    src, exp = load_model_config(args.source), load_model_config(args.exported)
    thr = src.score_threshold if args.threshold is None else args.threshold
    ref, other = load_engine(src, args.device), load_engine(exp, args.device)
    acc = Parity()
    for k in range(args.count):
        sc = generate_scene(10_000_000 + k, args.width, args.height)
        item = EngineInput(sc.color, sc.depth if src.input_kind == "rgbd" else None, thr)
        add(acc, ref.infer([item])[0], other.infer([item])[0], args.height, args.width, thr + 0.05)
    print(json.dumps({"reference": ref.name, "other": other.name, "scenes": args.count, "threshold": thr,
                      **acc.summary()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
