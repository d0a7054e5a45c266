#!/usr/bin/env python3
"""What the worker zygote's imports cost, for one or more checkouts of this repository, interleaved.

The zygote imports `dd.zygote.worker_preload(...)` for the engines it serves before it can fork a
worker: on the path start -> SERVING. Each run starts the checkout's own zygote (`python -m dd.zygote`,
its `dd` first on PYTHONPATH) as the supervisor does and times it from its start to its "ready" line
(wall time, and its CPU time: user + system, less hurt by a busy machine); runs of the checkouts
alternate (A B A B ...) so that a busy machine hurts each alike. Then one plain import of the same list
under `python -X importtime` says whether torch._dynamo was imported and what the largest packages cost.

    python scripts/bench_imports.py --engine fast --runs 9 --checkout main=/tmp/main --checkout new=.

No GPU needed (nothing touches CUDA); on a GPU host the numbers are those of that host's files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_requests import env_with_repo  # noqa: E402

PACKAGES = ("torch", "torchvision", "torch._dynamo", "triton", "cv2", "numpy", "zmq", "dd.worker.server",
            "dd.worker.engines")


def preload(checkout: Path, engines: str) -> list[str]:
    """The checkout's own worker_preload for these engines (what its supervisor would hand its zygote)."""
    code = ("import json, sys; from dd.config.engines import REGISTRY; from dd.zygote import worker_preload; "
            "print(json.dumps(worker_preload([REGISTRY[e].target.partition(':')[0] for e in sys.argv[1].split(',')])))")
    out = subprocess.run([sys.executable, "-c", code, engines], cwd=checkout, env=env_with_repo(checkout),
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def zygote_run(checkout: Path, modules: list[str]) -> dict:
    """One zygote started, timed to its "ready" line, then killed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dd.zygote", "--parent-pid", str(os.getpid()), *modules],
                            cwd=checkout, env=env_with_repo(checkout), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    wall = time.perf_counter() - t0
    proc.kill()  # not its clean exit: the CPU time counted is the start's, without the interpreter's teardown
    proc.wait(60)
    proc.stdin.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if b'"ready"' not in line:
        raise SystemExit(f"{checkout}: the zygote did not start ({line!r}, rc {proc.returncode})")
    return {"s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def importtime_run(checkout: Path, modules: list[str]) -> tuple[dict, str]:
    """The same modules imported once under -X importtime (through __import__, which is what it logs)."""
    code = ("import json, sys\nfor m in sys.argv[1:]: __import__(m)\n"
            "print(json.dumps({'dynamo': 'torch._dynamo' in sys.modules, 'modules': len(sys.modules)}))")
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *modules], cwd=checkout,
                         env=env_with_repo(checkout), capture_output=True, text=True, timeout=600)
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
    modules = {name: preload(path, args.engine) for name, path in checkouts.items()}
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(args.runs):
        for name, path in checkouts.items():
            runs[name].append(zygote_run(path, modules[name]))
    plain = {name: importtime_run(path, modules[name]) for name, path in checkouts.items()}
    print(f"| zygote for {args.engine}: start to ready, {args.runs} runs each, interleaved | "
          + " | ".join(checkouts) + " |")
    print("|---|" + "---|" * len(checkouts))
    print("| median wall s (min, max) | " + " | ".join(
        f"**{statistics.median(r['s'] for r in rs):.3f}** ({min(r['s'] for r in rs):.2f}, {max(r['s'] for r in rs):.2f})"
        for rs in runs.values()) + " |")
    print("| median CPU s (user + system) | " + " | ".join(
        f"{statistics.median(r['cpu_s'] for r in rs):.3f}" for rs in runs.values()) + " |")
    print("| imports torch._dynamo | " + " | ".join(str(plain[n][0]["dynamo"]) for n in checkouts) + " |")
    print("| modules in sys.modules | " + " | ".join(str(plain[n][0]["modules"]) for n in checkouts) + " |")
    tops = {name: largest(plain[name][1]) for name in checkouts}
    for pkg in PACKAGES:
        print(f"| of one `-X importtime` run: {pkg} | "
              + " | ".join(f"{tops[n][pkg]:.3f}" if pkg in tops[n] else "-" for n in checkouts) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
