#!/usr/bin/env python3
"""Frontend decode latency: one 1280x720 RGB-D frame (JPEG + 16-bit PNG) into a ring slot.

What a request pays in the frontend before it reaches a worker; runs on any machine.

    python scripts/bench_decode.py [--width 1280 --height 720 --iters 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dd.frontend.decode import decode_into_slot  # noqa: E402
from dd.frontend.protocols.detector_v1 import image_inputs  # noqa: E402
from dd.proto.deep_detection.v1 import detector_pb2 as pb  # noqa: E402
from dd.synth.scenes import generate_scene  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    scene = generate_scene(5000, args.width, args.height)
    _, jpg = cv2.imencode(".jpg", cv2.cvtColor(scene.color, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    _, png = cv2.imencode(".png", scene.depth)
    req = pb.DetectRequest(color=pb.Image(data=jpg.tobytes()), depth=pb.Image(data=png.tobytes()))
    slot = memoryview(bytearray(args.width * args.height * 5 + 4096))
    for _ in range(3):
        decode_into_slot(*image_inputs(req), True, slot, args.width * args.height)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        decoded = decode_into_slot(*image_inputs(req), True, slot, args.width * args.height)
        times.append((time.perf_counter() - t0) * 1e3)
    depth = np.ndarray((args.height, args.width), np.uint16, buffer=slot, offset=decoded.depth.offset)
    assert np.array_equal(depth, scene.depth), "depth did not survive the round trip"
    print(f"{args.width}x{args.height}: JPEG {len(jpg) // 1024} KiB + PNG {len(png) // 1024} KiB, "
          f"decode_into_slot p50 {np.median(times):.1f} ms, p99 {np.percentile(times, 99):.1f} ms")
    # Each half alone (OpenCV, one thread, as the frontend decodes): which one a GPU decoder could take.
    for name, data, flags in (("JPEG", jpg, cv2.IMREAD_COLOR), ("PNG", png, cv2.IMREAD_UNCHANGED)):
        half = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            cv2.imdecode(data, flags)
            half.append((time.perf_counter() - t0) * 1e3)
        print(f"  {name} alone: p50 {np.median(half):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
