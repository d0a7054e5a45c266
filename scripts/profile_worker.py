#!/usr/bin/env python3
"""Where a worker's time goes per batch, and what overlapping the GPU with the host's encoding buys.

A worker serves one batch after another: copy the inputs in, run the network, paste the masks and
make their RLE, then build and serialize one response per image. The engine's GPU work and the
host's response building used to run one after the other in one thread, so a batch cost their sum.
This script measures, on the worker core (dd/worker/core.py) with inputs in page-locked shared memory
as in a served worker:

- the engine call alone, by stage (the fast engine's own stage marks, synchronised);
- the core (engine + encoding) one batch after another;
- the encoding alone per image, per protocol;
- the core as the worker now runs it (dd/worker/pipeline.py: a batch is finished and its responses
  encoded after the next batch has started on the device);
- a cProfile of the serial core, top functions by own time;
- the pipelined loop's host time by phase (start the next batch, finish this one, encode its
  responses), wall and the thread's CPU, and a cProfile of it timed by the thread's CPU: with
  ENGINE_OPTIONS blocking_sync (--fast-options) the CPU is the host's own work, waits left out.
  At saturation that thread's host work per batch, against the GPU's time per batch, says which
  one limits a worker.

    python scripts/profile_worker.py --out $OUT/worker            # R50-FPN RGB-D, 100 detections, 1280x720
    python scripts/profile_worker.py --device cpu --arch small --height 96 --width 128 --batches 2 \
        --seconds 1 --out /tmp/pw                                  # CPU smoke run
    python scripts/profile_worker.py --batches 16 --fast-options '{"blocking_sync": true}' --out $OUT/w
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import mmap
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import make_model  # noqa: E402
from dd.config import load_model_config  # noqa: E402
from dd.synth.scenes import generate_scene  # noqa: E402


def shared_frames(n: int, height: int, width: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n synthetic RGB-D frames whose arrays live in one anonymous mapping, as ring slots do (so the
    engine page-locks them, as in a served worker)."""
    scenes = [generate_scene(100 + k, width, height) for k in range(n)]
    per = height * width * 3 + height * width * 2
    buf = mmap.mmap(-1, per * n)
    frames = []
    for k, s in enumerate(scenes):
        color = np.frombuffer(buf, np.uint8, height * width * 3, k * per).reshape(height, width, 3)
        depth = np.frombuffer(buf, np.uint16, height * width, k * per + height * width * 3).reshape(height, width)
        color[...] = s.color
        depth[...] = s.depth
        frames.append((color, depth))
    return frames


def p50(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def pipelined_phases(core, batch, seconds: float, profile_path: Path) -> dict:
    """The pipelined loop (as BatchPipeline runs it: start k+1, finish k, encode k) written out by
    phase, each timed by the wall clock and by this thread's CPU clock; then the same loop under a
    cProfile whose clock is the thread's CPU. Per batch, in ms."""
    phases = ("start", "finish", "encode")
    wall = {k: [] for k in phases}
    cpu = {k: [] for k in phases}

    def loop(until: float, record: bool) -> int:
        inflight = core.start_batch(batch())
        count = 0
        while time.perf_counter() < until or count < 5:
            marks = [(time.perf_counter(), time.thread_time())]
            following = core.start_batch(batch())
            marks.append((time.perf_counter(), time.thread_time()))
            inferred = core.finish_batch(inflight)
            marks.append((time.perf_counter(), time.thread_time()))
            core.encode_batch(inferred)
            marks.append((time.perf_counter(), time.thread_time()))
            inflight = following
            if record:
                for k, name in enumerate(phases):
                    wall[name].append((marks[k + 1][0] - marks[k][0]) * 1e3)
                    cpu[name].append((marks[k + 1][1] - marks[k][1]) * 1e3)
            count += 1
        core.finish_batch(inflight)
        return count

    loop(time.perf_counter() + 0.5, False)
    loop(time.perf_counter() + seconds, True)
    row = {f"pipelined_{name}_wall_ms": p50(wall[name]) for name in phases}
    row.update({f"pipelined_{name}_cpu_ms": p50(cpu[name]) for name in phases})
    row["pipelined_cycle_wall_ms"] = p50([sum(v) for v in zip(*wall.values())])
    row["pipelined_cycle_cpu_ms"] = p50([sum(v) for v in zip(*cpu.values())])
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    loop(time.perf_counter() + min(seconds, 2.0), False)
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    profile_path.write_text(text.getvalue())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--engine", default="fast")
    ap.add_argument("--arch", default="r50", choices=("r50", "small"))
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--detections", type=int, default=100)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--fast-options", default="{}", help="ENGINE_OPTIONS for the fast engine, as JSON "
                    "(e.g. '{\"blocking_sync\": true}')")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="keep glibc's allocator thresholds (a worker sets dd.procutil.return_large_allocations)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not args.glibc_defaults:
        from dd.procutil import return_large_allocations

        return_large_allocations()  # as a worker process does first
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from dd.worker.core import WorkerCore, WorkItem
    from dd.worker.encoders import EncodeContext, Timings, encoder_for
    from dd.worker.engines import load_engine
    from dd.worker.pipeline import BatchPipeline

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tmp = Path(tempfile.mkdtemp(prefix="dd-profile-worker-"))
    fast_options = json.loads(args.fast_options)
    folder = make_model(tmp, args.engine, args.arch, max(args.batches), args.height, args.width, args.detections,
                        args.min_size, fast_options=fast_options)
    cfg = load_model_config(folder)
    engine = load_engine(cfg, args.device)
    core = WorkerCore(cfg, engine, "profile")
    frames = shared_frames(max(args.batches), args.height, args.width)
    result: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "engine": engine.name,
                    "glibc_defaults": args.glibc_defaults, "fast_options": fast_options,
                    "arch": args.arch, "size": [args.height, args.width], "detections": args.detections,
                    "batches": {}}

    def items(n: int) -> list[WorkItem]:
        return [WorkItem(c, d) for c, d in frames[:n]]

    def timed(fn, seconds: float) -> list[float]:
        for _ in range(3):
            fn()
        sync()
        lat, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(lat) < 5:
            t0 = time.perf_counter()
            fn()
            lat.append((time.perf_counter() - t0) * 1e3)
        return lat

    for n in args.batches:
        row: dict = {}
        # The engine alone, then by stage.
        inputs = [it for it in items(n)]
        from dd.worker.engines.base import EngineInput
        eng_in = [EngineInput(i.color, i.depth, cfg.score_threshold) for i in inputs]
        row["engine_ms"] = p50(timed(lambda: engine.infer(eng_in), args.seconds))
        if hasattr(engine, "stage_times"):
            engine.stage_times = {}
            for _ in range(20):
                engine.infer(eng_in)
            row["engine_stages_ms"] = {k: p50(v) for k, v in engine.stage_times.items()}
            engine.stage_times = None
        # The core, serially: engine + one response per image.
        row["core_serial_ms"] = p50(timed(lambda: core.run(items(n)), args.seconds))
        row["core_serial_images_per_s"] = n * 1e3 / row["core_serial_ms"]
        dets = engine.infer(eng_in)
        row["instances_per_image"] = float(np.mean([len(d.scores) for d in dets]))
        row["rle_bytes_per_image"] = float(np.mean([sum(len(r) for r in (d.rle or [])) for d in dets]))
        for proto in ("detector_v1", "kserve_v2"):
            enc = encoder_for(proto)

            def encode_all() -> None:
                for d in dets:
                    enc(d, EncodeContext(cfg.categories, "r", cfg.name, "w", args.height, args.width, 0, Timings()))
            row[f"encode_{proto}_ms_per_image"] = p50(timed(encode_all, 1.0)) / n
        # Pipelined, as a worker runs at saturation: batch k is finished and encoded after batch k+1 has started.
        done: list[int] = []
        pipe = BatchPipeline(core, lambda outs, tag: done.append(len(outs)))
        for _ in range(3):
            pipe.push(items(n), None)
        pipe.flush()
        done.clear()
        lat, start = [], time.perf_counter()
        while time.perf_counter() - start < args.seconds or len(lat) < 5:
            t0 = time.perf_counter()
            pipe.push(items(n), None)
            lat.append((time.perf_counter() - t0) * 1e3)
        pipe.flush()
        wall = time.perf_counter() - start
        row["pipelined_ms"] = p50(lat)
        row["pipelined_images_per_s"] = sum(done) / wall
        row.update(pipelined_phases(core, lambda: items(n), args.seconds, args.out / f"cprofile_pipelined_cpu_batch{n}.txt"))
        # Where the serial core's host time goes.
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            core.run(items(n))
        sync()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        (args.out / f"cprofile_batch{n}.txt").write_text(text.getvalue())
        result["batches"][str(n)] = row
        print(json.dumps({n: row}, indent=1), flush=True)
    (args.out / "worker.json").write_text(json.dumps(result, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
