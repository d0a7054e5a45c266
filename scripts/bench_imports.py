#!/usr/bin/env python3
"""What the worker zygote's imports cost, for one or more checkouts of this repository, interleaved.

The zygote imports `dd.zygote.worker_preload(...)` for the engines it serves before it can fork a
worker: on the path start -> SERVING. Each run imports exactly that list in a fresh interpreter (the
checkout's own `dd` first on PYTHONPATH) and times it; runs of the checkouts alternate (A B A B ...) so
that a busy machine hurts each alike. Printed: the median wall and CPU time per checkout, whether torch._dynamo
was imported, and (from `python -X importtime` of one more run) the cumulative import time of the
largest packages.

    python scripts/bench_imports.py --engine fast --runs 9 --checkout main=/tmp/main --checkout new=.

No GPU needed (nothing touches CUDA); on a GPU host the numbers are those of that host's files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from dd.config.engines import REGISTRY
from dd.zygote import worker_preload
mods = [REGISTRY[e].target.partition(':')[0] for e in sys.argv[1].split(',')]
for m in worker_preload(mods):
    __import__(m)  # not importlib.import_module: -X importtime logs only what goes through __import__
print(json.dumps({"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "dynamo": "torch._dynamo" in sys.modules,
                  "modules": len(sys.modules)}))
"""
PACKAGES = ("torch", "torchvision", "torch._dynamo", "triton", "cv2", "numpy", "zmq", "dd.worker.server",
            "dd.worker.engines")


def run(checkout: Path, engines: str, importtime: bool = False) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", CHILD, engines]
    out = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{checkout}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def largest(importtime_log: str) -> dict[str, float]:
    """Cumulative seconds of each package in PACKAGES, where it was first imported."""
    got: dict[str, float] = {}
    for line in importtime_log.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m and m[2] in PACKAGES and m[2] not in got:
            got[m[2]] = int(m[1]) / 1e6
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="fast", help="engine name(s), comma-separated, as the zygote would preload")
    ap.add_argument("--checkout", action="append", required=True, help="NAME=PATH of a checkout (repeat)")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    checkouts = {name: Path(path).resolve() for name, path in (c.split("=", 1) for c in args.checkout)}
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(args.runs):
        for name, path in checkouts.items():
            runs[name].append(run(path, args.engine)[0])
    print(f"| zygote imports for {args.engine}, {args.runs} runs each, interleaved | "
          + " | ".join(checkouts) + " |")
    print("|---|" + "---|" * len(checkouts))
    print("| median wall s (min, max) | " + " | ".join(
        f"**{statistics.median(r['s'] for r in rs):.3f}** ({min(r['s'] for r in rs):.2f}, {max(r['s'] for r in rs):.2f})"
        for rs in runs.values()) + " |")
    print("| median CPU s (user + system: less hurt by a busy machine) | " + " | ".join(
        f"{statistics.median(r['cpu_s'] for r in rs):.3f}" for rs in runs.values()) + " |")
    print("| imports torch._dynamo | " + " | ".join(str(rs[0]["dynamo"]) for rs in runs.values()) + " |")
    print("| modules in sys.modules | " + " | ".join(str(rs[0]["modules"]) for rs in runs.values()) + " |")
    tops = {name: largest(run(path, args.engine, importtime=True)[1]) for name, path in checkouts.items()}
    for pkg in PACKAGES:
        print(f"| of one `-X importtime` run: {pkg} | "
              + " | ".join(f"{tops[n][pkg]:.3f}" if pkg in tops[n] else "-" for n in checkouts) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
