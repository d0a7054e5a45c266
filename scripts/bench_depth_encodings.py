#!/usr/bin/env python3
"""Depth encodings a client may send: size on the wire, client encode time, server decode time.

The numbers behind the client's choice of depth encoding (dd.client.api.pick_encoding): one
1280x720 16-bit depth frame from dd.synth per seed, one thread, medians over the frames.

A second table splits a 16-bit PNG's decode as the server now does it where the workers reconstruct
rows on their GPU (dd/frontend/png_depth.py, dd.png_rows): the frontend's part (chunks, CRCs, ISA-L
inflate into a slot-sized buffer, stopped at the first Average or Paeth row), whether the rows may go
as rows (all None, Sub or Up; else OpenCV decodes the file after that), and the reconstruction: the worker core's numpy fallback and the engines' torch function run on
the CPU here, for reference (on a GPU it is a few kernels).

    python scripts/bench_depth_encodings.py [--seeds 5000 5001 5002 --width 1280 --height 720 --iters 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dd.client.encoding import encode_png16  # noqa: E402
from dd.frontend.png_depth import inflate_into, parse  # noqa: E402
from dd.png_rows import unfilter  # noqa: E402
from dd.synth.scenes import generate_scene  # noqa: E402

cv2.setNumThreads(1)


def _best_ms(fn: Callable[[], object], iters: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[5000, 5001, 5002])
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="", help="also time the rows' reconstruction on this torch device "
                    "(e.g. cuda): one frame, and a batch of 16 in one call, synchronised")
    args = ap.parse_args()

    def png(level: int | None) -> tuple[Callable, Callable]:
        params = [] if level is None else [cv2.IMWRITE_PNG_COMPRESSION, level]
        return (lambda d: cv2.imencode(".png", d, params)[1].tobytes(),
                lambda b, shape: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED))

    def zstd(level: int) -> tuple[Callable, Callable]:
        comp, dec = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        return (lambda d: comp.compress(d.tobytes()),
                lambda b, shape: np.frombuffer(dec.decompress(b), np.uint16).reshape(shape))

    kinds = {"raw": (lambda d: d.tobytes(), lambda b, shape: np.frombuffer(b, np.uint16).reshape(shape)),
             "png (cv2 default)": png(None), "png level 1": png(1),
             "png (client library: Sub rows, ISA-L, 8 flushed runs)": (encode_png16, png(None)[1]),
             "zstd level 1": zstd(1), "zstd level 3": zstd(3)}
    rows: dict[str, list[tuple[int, float, float]]] = {k: [] for k in kinds}
    for seed in args.seeds:
        depth = generate_scene(seed, args.width, args.height).depth
        for name, (encode, decode) in kinds.items():
            enc_ms, data = _best_ms(lambda: encode(depth), args.iters)
            dec_ms, back = _best_ms(lambda: decode(data, depth.shape), args.iters)
            assert np.array_equal(back, depth), name
            rows[name].append((len(data), enc_ms, dec_ms))
    print(f"{len(args.seeds)} dd.synth depth frames {args.width}x{args.height} uint16 (seeds {args.seeds}), "
          "medians, one thread")
    print("| encoding | size KiB | encode ms | decode ms |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        a = np.array(r, dtype=float)
        print(f"| {name} | {np.median(a[:, 0]) / 1024:.0f} | {np.median(a[:, 1]):.2f} | {np.median(a[:, 2]):.2f} |")
    _png_rows_table(args)
    if args.device:
        _device_table(args)
    return 0


def _device_table(args: argparse.Namespace) -> None:
    """The fast engine's reconstruction (png_unfilter.unfilter_rows) on a device: what it adds to a batch."""
    import torch

    from dd.worker.engines.png_unfilter import unfilter_rows

    dev = torch.device(args.device)
    h, w = args.height, args.width
    depth = generate_scene(args.seeds[0], w, h).depth
    data = cv2.imencode(".png", depth)[1].tobytes()
    rows = inflate_into(parse(data), np.empty(h * (1 + 2 * w), np.uint8))
    assert rows is not None, "cv2's default PNG goes as rows"
    print()
    print(f"rows reconstructed on {dev} (png_unfilter.unfilter_rows, synchronised, median of {args.iters})")
    print("| batch | ms per call | ms per image |")
    print("|---|---|---|")
    for batch in (1, 16):
        staged = torch.from_numpy(np.stack([rows] * batch)).to(dev)
        out = torch.empty((batch, h, w), dtype=torch.uint16, device=dev)

        def run() -> torch.Tensor:
            unfilter_rows(staged, w, out)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return out

        run()  # warm-up
        ms, got = _best_ms(run, args.iters)
        assert np.array_equal(got[0].cpu().numpy(), depth)
        print(f"| {batch} | {ms:.3f} | {ms / batch:.3f} |")


def _png_rows_table(args: argparse.Namespace) -> None:
    import torch

    from dd.worker.engines.png_unfilter import unfilter_rows

    torch.set_num_threads(1)
    h, w = args.height, args.width
    buf = np.empty(h * (1 + 2 * w), np.uint8)
    table: dict[str, list[tuple[float, ...]]] = {}
    for seed in args.seeds:
        depth = generate_scene(seed, w, h).depth
        for name, params in (("png (cv2 default)", []), ("png level 1", [cv2.IMWRITE_PNG_COMPRESSION, 1]),
                             ("png (client library)", None)):
            data = encode_png16(depth) if params is None else cv2.imencode(".png", depth, params)[1].tobytes()

            front_ms, rows = _best_ms(lambda: inflate_into(parse(data), buf), args.iters)
            sent = rows is not None
            cv_ms, _ = _best_ms(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), args.iters)
            np_ms = torch_ms = float("nan")
            if sent:
                np_ms, back = _best_ms(lambda: unfilter(rows, h, w), args.iters)
                assert np.array_equal(back, depth), name
                t_rows = torch.from_numpy(rows)
                torch_ms, back = _best_ms(lambda: unfilter_rows(t_rows, w), args.iters)
                assert np.array_equal(back.numpy(), depth), name
            table.setdefault(name, []).append((front_ms, float(sent), np_ms, torch_ms, cv_ms))
    print()
    print("16-bit PNG as rows: the frontend's part, and the reconstruction (medians, one thread)")
    print("| png | frontend: parse + CRC + ISA-L inflate (until an Average/Paeth row) ms | frames sent as rows | "
          "numpy unfilter ms (worker fallback) | torch unfilter on the CPU ms | OpenCV decode ms (before) |")
    print("|---|---|---|---|---|---|")
    for name, r in table.items():
        a = np.array(r, dtype=float)
        unfilters = [f"{np.median(c[~np.isnan(c)]):.2f}" if (~np.isnan(c)).any() else "-" for c in (a[:, 2], a[:, 3])]
        print(f"| {name} | {np.median(a[:, 0]):.2f} | {int(a[:, 1].sum())}/{len(a)} | {unfilters[0]} | "
              f"{unfilters[1]} | {np.median(a[:, 4]):.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
