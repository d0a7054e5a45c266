#!/usr/bin/env python3
"""What an idle gap before each call costs: the frontend's decode and the worker's engine, one after
another vs each after the process slept or spun (as at concurrency 1, where every step waits for the others).

A lone served request's steps took longer than the same steps timed back to back (on an H200 host the
decode 4.7 against 3.2 ms, the engine's part 7.1-8.0 against 5.3 ms with its responses): either what
serving adds, or the machine itself, whose cores (and GPU) go idle while a request is elsewhere. Here
each step runs in one process, interleaved: back to back, then with a sleep of --gap-ms before each
call, then with the calling thread spinning that long instead (its core kept busy, the GPU idle), then
with the GPU kept busy for the gap's last --lead-ms (one block spinning; or matrix products on every
SM, as a worker could start when a frontend begins to decode a request). The engine's calls are also
timed on the GPU (CUDA events around each call), to tell the device's time from the host's, and the
GPU's clocks are read (NVML, where pynvml is installed) just before each call. Prints tables of medians.

    python scripts/bench_idle_gaps.py --calls 200 --gap-ms 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def spin(seconds: float) -> None:
    """This thread busy for `seconds` (its core kept from idling)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def timed(fn, calls: int, gap=None, after=None) -> list[float]:  # noqa: ANN001
    """ms per call (wall), each call after gap() (None: back to back); `after` (e.g. a device sync) inside
    the time."""
    lat = []
    for _ in range(calls):
        if gap is not None:
            gap()
        t0 = time.perf_counter()
        fn()
        if after is not None:
            after()
        lat.append((time.perf_counter() - t0) * 1e3)
    return lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=12.0)
    ap.add_argument("--lead-ms", type=float, default=4.0, help="the GPU spin kernel's length, at the gap's end")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each case")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--no-engine", action="store_true", help="the decode alone (no GPU needed)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    h, w = 720, 1280

    from dd.client.encoding import encode_jpeg, encode_png16
    from dd.frontend import decode as frontend_decode
    from dd.frontend.inputs import ImageInput
    from dd.synth.scenes import generate_scene

    scene = generate_scene(5000, w, h)
    jpg, png = encode_jpeg(scene.color, quality=90), encode_png16(scene.depth)
    slot = memoryview(bytearray(h * w * 5 + 4096))

    def decode() -> None:
        frontend_decode.decode_into_slot(ImageInput(jpg), ImageInput(png), True, slot, h * w, png_rows_to_worker=True)

    gap_s = args.gap_ms / 1e3
    gaps = {"back to back": None, f"after {args.gap_ms:g} ms idle": lambda: time.sleep(gap_s),
            f"after {args.gap_ms:g} ms spinning": lambda: spin(gap_s)}
    cases = {"frontend decode (client library's JPEG + PNG, as rows)": (decode, None, None)}
    clocks: dict = {}
    if not args.no_engine:
        import torch

        from bench_serve import STEADY_FAST, make_model
        from dd.config import load_model_config
        from dd.worker.core import WorkerCore, WorkItem
        from dd.worker.engines import load_engine
        from dd.worker.engines.base import EngineInput

        folder = make_model(Path(tempfile.mkdtemp(prefix="dd-idle-")), "fast", "r50", 1, h, w, 100, 800,
                            fast_options=STEADY_FAST)
        cfg = load_model_config(folder)
        engine = load_engine(cfg, args.device)
        core = WorkerCore(cfg, engine, "idle")
        depth = np.ascontiguousarray(scene.depth)
        item = [EngineInput(scene.color, depth, cfg.score_threshold)]
        gpu_ms: list[float] = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def infer() -> None:
            start.record()
            engine.infer(item)
            end.record()

        def gpu_time() -> None:
            end.synchronize()
            gpu_ms.append(start.elapsed_time(end))

        # A kernel that keeps one block of the GPU busy for the gap's last `lead` ms (torch.cuda._sleep spins for
        # a number of GPU clock cycles; cycles per ms measured here, at the clock a busy GPU runs at).
        side = torch.cuda.Stream(priority=0)
        torch.cuda._sleep(10**6)
        t_start, t_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t_start.record()
        torch.cuda._sleep(10**7)
        t_end.record()
        t_end.synchronize()
        cycles_per_ms = 10**7 / t_start.elapsed_time(t_end)
        lead_s = min(gap_s, args.lead_ms / 1e3)

        def gpu_warmed() -> None:
            time.sleep(gap_s - lead_s)
            with torch.cuda.stream(side):
                torch.cuda._sleep(int(cycles_per_ms * lead_s * 1e3 * 0.9))
            time.sleep(lead_s)

        gaps[f"after {args.gap_ms - args.lead_ms:g} ms idle and {args.lead_ms:g} ms of a GPU spin kernel"] = gpu_warmed

        # Matrix products on every SM for the gap's last `lead` ms: as many as fill it, timed here.
        a = torch.randn(4096, 4096, device=args.device, dtype=torch.float16)
        torch.mm(a, a)
        torch.cuda.synchronize()
        t_start.record()
        for _ in range(10):
            torch.mm(a, a)
        t_end.record()
        t_end.synchronize()
        mm_ms = t_start.elapsed_time(t_end) / 10
        mms = max(1, round(args.lead_ms * 0.9 / mm_ms))

        def gpu_loaded() -> None:
            time.sleep(gap_s - lead_s)
            with torch.cuda.stream(side):
                for _ in range(mms):
                    torch.mm(a, a)
            time.sleep(lead_s)

        gaps[f"after {args.gap_ms - args.lead_ms:g} ms idle and {args.lead_ms:g} ms of products on every SM"] = \
            gpu_loaded
        clocks.update(_clock_reader())
        cases["engine call, batch 1"] = (infer, gpu_time, gpu_ms)
        cases["worker core, batch 1 (engine + response)"] = (lambda: core.run([WorkItem(scene.color, depth)]), None,
                                                             None)
    results: dict[str, dict[str, list[float]]] = {}
    gpu: dict[str, list[float]] = {}
    seen_clocks: dict[str, list[tuple[int, int]]] = {}
    for name, (fn, after, _) in cases.items():  # warm-up
        timed(fn, 10, None, after)
    for _ in range(args.rounds):
        for name, (fn, after, gpu_list) in cases.items():
            for label, gap in gaps.items():
                if gpu_list is not None:
                    gpu_list.clear()
                if gpu_list is not None and clocks:  # the clocks just before each engine call
                    read, inner = clocks["read"], gap
                    gap = (lambda inner=inner, label=label: (inner() if inner else None,
                                                             seen_clocks.setdefault(label, []).append(read())))
                results.setdefault(name, {}).setdefault(label, []).extend(timed(fn, args.calls, gap, after))
                if gpu_list is not None:
                    gpu.setdefault(f"{name}|{label}", []).extend(gpu_list)
    labels = list(gaps)
    print(f"## One step back to back vs after an idle gap ({args.rounds} rounds x {args.calls} calls, medians, ms)\n")
    print("| step | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    summary = {}
    for name, per in results.items():
        med = [statistics.median(per[label]) for label in labels]
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in med) + " |")
        summary[name] = dict(zip(labels, med))
        if any(k.startswith(name + "|") for k in gpu):
            g = [statistics.median(gpu[f"{name}|{label}"]) for label in labels]
            print("| of it on the GPU (CUDA events) | " + " | ".join(f"{m:.2f}" for m in g) + " |")
            summary[name + ", GPU"] = dict(zip(labels, g))
    if seen_clocks:
        print("\n## The GPU's clocks just before each engine call (NVML, medians; min-max), MHz\n")
        print("| clock | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for i, clock in enumerate(("SM", "memory")):
            cells = []
            for label in labels:
                v = [c[i] for c in seen_clocks.get(label, [])]
                cells.append(f"{statistics.median(v):.0f} ({min(v)}-{max(v)})" if v else "-")
            print(f"| {clock} | " + " | ".join(cells) + " |")
        summary["clocks"] = {label: seen_clocks[label] for label in seen_clocks}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def _clock_reader() -> dict:
    """{"read": () -> (SM MHz, memory MHz)} of GPU 0 through NVML, or {} where pynvml is not installed."""
    try:
        import pynvml
    except ImportError:
        return {}
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return {"read": lambda: (pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                             pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))}


if __name__ == "__main__":
    raise SystemExit(main())
