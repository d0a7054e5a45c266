#!/usr/bin/env python3
"""Where the fast engine's start-up goes: one fresh process per variant, phases timed from inside.

Each variant loads an R50-FPN RGB-D random model (1280x720 warm-up, MAX_BATCH_SIZE 8)
in a new Python process (so imports, CUDA init, Triton's compile cache and cuDNN's
autotuning are what a restarted worker sees) and reports: import torch, import the
engine, the engine's load phases (its own log line), each graph capture (warm-up runs
vs the capture), then what a request at a new size costs in service (a capture), and
the per-image time of the paths that need no capture (the fixed-shape network run
op by op, the dynamic path).

    python scripts/profile_startup.py --out $OUT/startup      # GPU; about 3-4 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = [  # name, fresh Triton cache?, fast-engine options
    ("cold", True, {}),
    ("warm", False, {}),
    ("warm, cudnn_benchmark on", False, {"cudnn_benchmark": True}),
    ("warm, capture in service", False, {"background_capture": False}),
    ("warm, spinning sync", False, {"blocking_sync": False}),
    # Issue #18: the kernels compile once for every size; these two show what the load-time op-by-op run at
    # an odd size (warmup_odd_size) adds to that, cold (each with an empty Triton cache of its own) and warm.
    ("cold, no odd-size run", True, {"warmup_odd_size": False}),
    ("warm, no odd-size run", False, {"warmup_odd_size": False}),
]


def child(folder: str, opts: dict, device: str, probe_sizes: list[list[int]]) -> dict:
    t0 = time.perf_counter()
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{time.perf_counter() - t0:7.2f}s {record.getMessage()}")

    logging.basicConfig(level=logging.INFO)
    logging.getLogger().addHandler(Keep())
    import torch

    def sync() -> None:
        """As the worker does every CUDA call: through the engine, never while a graph records."""
        if device.startswith("cuda"):
            with engine._graph_cache.recording:
                torch.cuda.synchronize()

    t_torch = time.perf_counter() - t0
    import numpy as np

    from dd.config import load_model_config
    from dd.worker.engines.base import EngineInput
    from dd.worker.engines.fast.engine import FastMaskRCNN

    t_import = time.perf_counter() - t0
    cfg = load_model_config(Path(folder))
    cfg = dataclasses.replace(cfg, engine_options={**cfg.engine_options, **opts})
    engine = FastMaskRCNN(cfg, device)
    t_load0 = time.perf_counter()
    engine.load()
    sync()
    t_load = time.perf_counter() - t_load0
    rng = np.random.default_rng(0)

    def inputs(h: int, w: int, n: int = 1) -> list:
        return [EngineInput(rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                            rng.integers(300, 3000, (h, w), dtype=np.uint16), 0.05) for _ in range(n)]

    def timed(h: int, w: int, n: int = 1, reps: int = 1) -> list[float]:
        out = []
        for _ in range(reps):
            batch = inputs(h, w, n)
            sync()
            t = time.perf_counter()
            engine.infer(batch)
            sync()
            out.append((time.perf_counter() - t) * 1e3)
        return out

    served = {"1280x720 b1 ms": sorted(timed(720, 1280, 1, 12))[6]}
    # Host CPU per image while serving back to back (the engine's own; spinning on the GPU counts).
    batch = inputs(720, 1280)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(100):
        engine.infer(batch)
    served["1280x720 b1 wall ms, 100 in a row"] = (time.perf_counter() - wall) * 10
    served["1280x720 b1 host CPU ms per image"] = (time.process_time() - cpu) * 10
    same = True
    for h, w in probe_sizes:
        probe = inputs(h, w)
        sync()
        t = time.perf_counter()
        first_det = engine.infer(probe)[0]  # no graph yet: op by op (or captured here, without background)
        sync()
        served[f"{w}x{h} first ms"] = (time.perf_counter() - t) * 1e3
        served[f"{w}x{h} more while capturing ms"] = max(timed(h, w, 1, 3))
        t = time.perf_counter()
        engine._graph_cache.wait_idle(120)
        served[f"{w}x{h} background capture s"] = time.perf_counter() - t
        served[f"{w}x{h} then ms"] = sorted(timed(h, w, 1, 7))[3]
        graph_det = engine.infer(probe)[0]
        same = same and len(first_det.scores) == len(graph_det.scores) and bool(
            np.allclose(first_det.boxes, graph_det.boxes, atol=1e-2)) and first_det.rle == graph_det.rle
    served["op-by-op answers equal the graph's"] = float(same)
    return {"import torch s": t_torch, "import engine s": t_import - t_torch, "engine load s": t_load,
            "process total s": time.perf_counter() - t0, "served": served, "log": records}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "OPTS_JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", help="variant names to run (default all)")
    args = ap.parse_args()
    probe_sizes = [[480, 640], [1080, 1920]]
    if args.child:
        res = child(args.child[0], json.loads(args.child[1]), args.device, probe_sizes)
        Path(args.out).write_text(json.dumps(res, indent=1))
        return 0
    from dd.config import DEFAULT_ARCHITECTURE
    from dd.models.model_folder import random_model_folder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    folder = random_model_folder(tmp / "r50", input_kind="rgbd", seed=0,
                                 architecture=dict(DEFAULT_ARCHITECTURE, max_detections=100), min_size=800,
                                 max_size=1333, score_threshold=0.0,
                                 extra={"ENGINE": "fast", "MAX_BATCH_SIZE": 8,
                                        "ENGINE_OPTIONS": {"warmup_sizes": [[720, 1280]]}})
    cache = tmp / "triton-cache"
    results = {}
    for name, fresh, opts in VARIANTS:
        if args.only and name not in args.only:
            continue
        # The first cold run starts with an empty Triton cache and fills it; the warm ones reuse it; a later
        # cold one gets an empty cache of its own.
        assert fresh or cache.exists(), "a cold variant must run first"
        own = cache if not cache.exists() or not fresh else tmp / f"triton-cache-{len(results)}"
        env = dict(os.environ, TRITON_CACHE_DIR=str(own))
        dest = out / f"{name.replace(' ', '_').replace(',', '')}.json"
        t = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--out", str(dest), "--device", args.device,
                               "--child", str(folder), json.dumps(opts)], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-3000:]}")
            continue
        res = json.loads(dest.read_text())
        res["wall s"] = wall
        results[name] = res
        print(f"== {name}: process {wall:.1f} s (torch {res['import torch s']:.1f}, engine import "
              f"{res['import engine s']:.1f}, load {res['engine load s']:.1f})")
        for line in res["log"]:
            if "captured" in line or "loaded in" in line or "op by op at" in line:
                print("   ", line)
        print("    served:", ", ".join(f"{k} {v:.1f}" for k, v in res["served"].items()))
    (out / "startup.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
