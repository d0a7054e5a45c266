#!/usr/bin/env python3
"""Frontend decode latency: one 1280x720 RGB-D frame (JPEG + 16-bit PNG) into a ring slot.

What a lone request pays in the frontend before it reaches a worker; runs on any machine. Two ways of
writing the same frame, side by side, in interleaved rounds:

- opencv: cv2.imencode's JPEG (quality 90) and PNG, what a user's files usually are;
- client library: dd.client.encoding's JPEG (same quality, a restart marker at each MCU row) and
  PNG (Sub rows, flushed every eighth of them), which the frontend may decode in parts at once
  (dd/frontend/jpeg_strips.py, png_depth.inflate_parts_into).

Each with the depth's rows sent as rows (what GPU workers take: `--rows`, the default) or as pixels,
color and depth together and each alone, with up to `--parts` parts per image (default: what the
frontend picks on this machine's cores) and with 1 (one decode each, as before).

    python scripts/bench_decode.py [--width 1280 --height 720 --rounds 5 --iters 20 --parts 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dd.client.encoding import encode_jpeg, encode_png16  # noqa: E402
from dd.frontend import decode as frontend_decode  # noqa: E402
from dd.frontend.decode import decode_into_slot  # noqa: E402
from dd.frontend.inputs import ImageInput  # noqa: E402
from dd.synth.scenes import generate_scene  # noqa: E402


def writers(scene) -> dict[str, tuple[bytes, bytes]]:
    jpg = cv2.imencode(".jpg", cv2.cvtColor(scene.color, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
    png = cv2.imencode(".png", scene.depth)[1]
    return {"opencv": (jpg.tobytes(), png.tobytes()),
            "client library": (encode_jpeg(scene.color, quality=90), encode_png16(scene.depth))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every case")
    ap.add_argument("--iters", type=int, default=20, help="decodes per case and round")
    ap.add_argument("--parts", type=int, default=frontend_decode.STRIPS_BESIDE_DEPTH,
                    help="parts per image when split (default: the frontend's choice here, beside a depth image)")
    ap.add_argument("--pixels", action="store_true", help="depth as pixels (CPU workers) instead of rows")
    args = ap.parse_args()
    h, w = args.height, args.width
    scene = generate_scene(5000, w, h)
    files = writers(scene)
    slot = memoryview(bytearray(h * w * 5 + 4096))
    rows = not args.pixels
    cases = []
    for writer, (jpg, png) in files.items():
        for what in ("color + depth", "color", "depth"):
            for parts in sorted({1, args.parts}):
                cases.append((writer, what, parts, jpg, png))

    def run(case) -> float:
        writer, what, parts, jpg, png = case
        frontend_decode.set_parts(parts)  # as --decode-parts sets them
        if what == "depth":  # depth alone: the color as raw pixels (a copy, no decode)
            color = ImageInput(scene.color.tobytes(), "raw", (h, w, 3), "uint8")
        else:
            color = ImageInput(jpg)
        depth = ImageInput(png) if what != "color" else None
        t0 = time.perf_counter()
        decode_into_slot(color, depth, depth is not None, slot, h * w, png_rows_to_worker=rows)
        return (time.perf_counter() - t0) * 1e3

    times: dict[tuple, list[float]] = {c[:3]: [] for c in cases}
    for case in cases:  # warm-up, and the result checked once
        run(case)
    for _ in range(args.rounds):
        for case in cases:
            times[case[:3]] += [run(case) for _ in range(args.iters)]
    sizes = {k: (len(j) // 1024, len(p) // 1024) for k, (j, p) in files.items()}
    print(f"## Frontend decode of one {w}x{h} RGB-D frame, {os.cpu_count()} cores, depth as "
          f"{'rows' if rows else 'pixels'}, medians over {args.rounds} x {args.iters} (ms)\n")
    print("| written by | JPEG KiB | PNG KiB | decoded | 1 part | " + f"up to {args.parts} parts |")
    print("|---|---|---|---|---|---|")
    for writer in files:
        for what in ("color + depth", "color", "depth"):
            one = np.median(times[(writer, what, 1)])
            many = np.median(times[(writer, what, args.parts)])
            print(f"| {writer} | {sizes[writer][0]} | {sizes[writer][1]} | {what} | {one:.2f} | {many:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
