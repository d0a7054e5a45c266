#!/usr/bin/env python3
"""What encoding one response costs a worker, per protocol, for one or more checkouts, interleaved.

A worker's one inference thread encodes every response of a batch while the GPU runs the next batch,
and at saturation that thread is the limit (BENCHMARKS.md, S11-7), so each response's encoding is
host time the GPU may wait for. Each round runs a child process per checkout (its `dd` first on
PYTHONPATH, the worker's allocator settings, dd.procutil.return_large_allocations) that encodes the
same made-up detections `--encodes` times per protocol and prints the median; the checkouts' children
alternate (A B A B ...) so that a busy machine hurts each alike. No GPU needed.

    git worktree add /tmp/before HEAD~1
    python scripts/bench_encode.py --checkout before=/tmp/before --checkout after=. --rounds 10 [--rle-text]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_requests import env_with_repo  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, statistics, sys, time
from dd.procutil import return_large_allocations
return_large_allocations()
import numpy as np
from dd.worker.encoders import EncodeContext, Timings, encoder_for
from dd.worker.engines.base import Detections

cases, protocols, encodes, rle_text = json.loads(sys.argv[1])
out = {}
for n, mask_bytes in cases:
    rng = np.random.default_rng(n * 7919 + mask_bytes)
    det = Detections(rng.uniform(0, 700, (n, 4)).astype(np.float32), rng.uniform(0.05, 1, n).astype(np.float32),
                     rng.integers(1, 3, n), None,
                     [bytes(rng.integers(48, 111, mask_bytes).astype(np.uint8)) for _ in range(n)])
    if rle_text:  # the strings back to back in one buffer, as the fast engine reads them back
        from dd.worker.engines.base import RleText  # a checkout older than RleText can still run the lists
        det.rle = RleText(np.frombuffer(b"".join(det.rle), np.uint8), [k * mask_bytes for k in range(n + 1)])
    for protocol in protocols:
        encode = encoder_for(protocol)
        times = []
        for _ in range(encodes + 3):
            ctx = EncodeContext(("box", "bag"), "r1", "model", "w", 720, 1280, 0, Timings(queue_us=5, batch_size=16),
                                received_at=time.time())
            t = time.perf_counter()
            encode(det, ctx)
            times.append((time.perf_counter() - t) * 1e3)
        out[f"{protocol} {n} x {mask_bytes} B"] = statistics.median(times[3:])
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkout", action="append", default=[], metavar="NAME=PATH",
                    help="a checkout of this repository (repeatable; default: this one)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--encodes", type=int, default=50, help="encodes per case, protocol and round")
    ap.add_argument("--protocols", nargs="+", default=["detector_v1", "kserve_v2"])
    ap.add_argument("--cases", nargs="+", default=["100x6000", "100x300", "20x300"],
                    help="INSTANCESxMASK_BYTES: instances per response and bytes of each mask's RLE")
    ap.add_argument("--rle-text", action="store_true",
                    help="the masks' strings in one buffer (RleText), as the fast engine gives them; "
                         "default a list of bytes, as the CPU engines do")
    args = ap.parse_args()
    checkouts = [(c.partition("=")[0], Path(c.partition("=")[2]).resolve()) for c in args.checkout] or [("this", REPO)]
    cases = [[int(x) for x in c.split("x")] for c in args.cases]
    spec = json.dumps([cases, args.protocols, args.encodes, args.rle_text])
    medians: dict[str, dict[str, list[float]]] = {name: {} for name, _ in checkouts}
    for _ in range(args.rounds):
        for name, path in checkouts:
            run = subprocess.run([sys.executable, "-c", CHILD, spec], cwd=path, env=env_with_repo(path), check=True,
                                 capture_output=True, text=True)
            for key, ms in json.loads(run.stdout.strip().splitlines()[-1]).items():
                medians[name].setdefault(key, []).append(ms)
    keys = list(next(iter(medians.values())))
    print(f"One response's encoding, ms (median of {args.encodes} per round; median over {args.rounds} rounds, "
          f"min-max of the rounds), {os.cpu_count()} cores")
    print("| protocol, instances x mask bytes | " + " | ".join(name for name, _ in checkouts) + " |")
    print("|---|" + "---|" * len(checkouts))
    for key in keys:
        cells = []
        for name, _ in checkouts:
            v = medians[name].get(key, [])
            cells.append(f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "-")
        print(f"| {key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
