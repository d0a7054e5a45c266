#!/usr/bin/env python3
"""What compiling the Triton kernels ahead saves a cold engine load (dd/worker/engines/kernels/preload.py).

Each step is a fresh process with its own caches (TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, CUDA_CACHE_PATH,
XDG_CACHE_HOME in a folder of the step's; "cold": an empty one), R50-FPN RGB-D 1280x720, the fast engine:

  1. record: a cold load that writes the kernels it compiles to --manifest;
  2. cold: a load with empty caches (no preload), then warm: the same caches again;
  3. preloaded: `python -m dd.worker.engines.kernels.preload` into empty caches (timed, with its imports),
     then a load with those caches.

Prints the engine's load times (its own log line) and the preload's wall time. GPU only.

    python scripts/bench_kernel_preload.py --manifest /tmp/manifest.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

LOAD = ("import logging, sys; logging.basicConfig(level=logging.INFO); "
        "from dd.config import load_model_config; from dd.worker.engines import load_engine; "
        "load_engine(load_model_config(sys.argv[1]), 'cuda:0').close()")
LOADED = re.compile(r"fast engine loaded in ([\d.]+) s")


def run(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({p.returncode}):\n{out[-3000:]}")
    return wall, out


def load_s(out: str) -> float:
    m = LOADED.search(out)
    return float(m.group(1)) if m else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--processes", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    from bench_serve import make_model
    from bench_startup import cache_env

    tmp = Path(tempfile.mkdtemp(prefix="dd-preload-"))
    folder = make_model(tmp, "fast", "r50", 16, 720, 1280, 100, 800)
    py = sys.executable
    wall, out = run([py, "-m", "dd.worker.engines.kernels.preload", "--record", str(folder), "--manifest",
                     str(args.manifest)], cache_env({}, tmp / "record"))
    print(f"record (a cold load): engine load {load_s(out):.1f} s; {out.strip().splitlines()[-1]}", flush=True)
    rows = []
    for r in range(args.rounds):
        cold_env = cache_env({}, tmp / f"cold{r}")
        rows.append(("cold", load_s(run([py, "-c", LOAD, str(folder)], cold_env)[1]), None))
        rows.append(("warm (the cold one's caches)", load_s(run([py, "-c", LOAD, str(folder)], cold_env)[1]), None))
        pre_env = cache_env({}, tmp / f"pre{r}")
        pre_wall, pre_out = run([py, "-m", "dd.worker.engines.kernels.preload", "--manifest", str(args.manifest),
                                 "--processes", str(args.processes)], pre_env)
        rows.append(("preloaded into empty caches", load_s(run([py, "-c", LOAD, str(folder)], pre_env)[1]),
                     (pre_wall, pre_out.strip().splitlines()[-1])))
    print("\n| caches | engine load s | preload (wall s, with its imports) |\n|---|---|---|")
    for name, s, pre in rows:
        print(f"| {name} | {s:.1f} | {'' if pre is None else f'{pre[0]:.1f} ({pre[1]})'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
