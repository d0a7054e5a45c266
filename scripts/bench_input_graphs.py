#!/usr/bin/env python3
"""The fast engine at batch 1 with and without input graphs (ENGINE_OPTIONS input_graphs), or another of its
on/off options (--option graph_masks: the masks pasted inside the network's graph), in one process.

Two engines of the same R50-FPN RGB-D model (random weights, 1280x720), one preparing its inputs op by op and
one through input graphs, run the same image interleaved: back to back, and each call after --gap-ms asleep
(as a lone request finds the worker). The inputs lie in a page-locked mapping per engine, as a frontend's ring
does, with depth as PNG rows (filter None: what frontends send this engine for a PNG) or as raw uint16 pixels.
First it checks that both engines give the same answers. --profile also traces the input-graph engine's calls
with torch.profiler and prints, per call, the kernels' summed GPU time, the span from the first kernel's
start to the last one's end, and the GPU's idle time inside that span (the host not keeping up).

    python scripts/bench_input_graphs.py --calls 60 --rounds 3 --profile
    python scripts/bench_input_graphs.py --option graph_masks --batch 1 16 --calls 60 --rounds 3 --profile
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def kernel_spans(trace_path: Path, prefix: str) -> dict[str, dict[str, float]]:
    """Per record_function range named prefix|mode|i: medians over each mode's calls (us) of the kernels'
    summed time, their span and the GPU's idle time inside it."""
    ev = json.loads(trace_path.read_text())["traceEvents"]
    calls = [e for e in ev if e.get("cat") == "user_annotation" and e.get("name", "").startswith(prefix)]
    runtime = {e["args"].get("correlation"): e for e in ev if e.get("cat") == "cuda_runtime" and "args" in e}
    per: dict[str, list[dict]] = {}
    for k in (e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")):
        r = runtime.get(k.get("args", {}).get("correlation"))
        if r is None:
            continue
        for c in calls:
            if c["ts"] <= r["ts"] <= c["ts"] + c["dur"]:
                per.setdefault(c["name"], []).append(k)
                break
    stats: dict[str, dict[str, list[float]]] = {}
    for name, ks in per.items():
        mode = name.split("|")[1]
        busy = sum(k["dur"] for k in ks)
        span = max(k["ts"] + k["dur"] for k in ks) - min(k["ts"] for k in ks)
        s = stats.setdefault(mode, {"kernels": [], "GPU busy us": [], "span us": [], "GPU idle in span us": []})
        s["kernels"].append(len(ks))
        s["GPU busy us"].append(busy)
        s["span us"].append(span)
        s["GPU idle in span us"].append(span - busy)
    return {m: {k: statistics.median(v) for k, v in s.items()} for m, s in stats.items()}


def differences(a: list, b: list, height: int, width: int) -> str:
    """Where two engines' answers to the same batch differ: per image, the instances whose boxes, scores or
    RLE strings differ, and for the strings, whether they decode (pycocotools) to different masks."""
    from pycocotools import mask as mask_util

    lines = []
    for k, (x, y) in enumerate(zip(a, b)):
        if len(x.scores) != len(y.scores):
            lines.append(f"image {k}: {len(x.scores)} against {len(y.scores)} instances")
            continue
        boxes = np.flatnonzero(np.any(x.boxes != y.boxes, axis=1))
        scores = np.flatnonzero(x.scores != y.scores)
        strings = [i for i in range(len(x.scores)) if x.rle[i] != y.rle[i]]
        pixels = []
        for i in strings[:5]:
            try:
                m = [mask_util.decode({"size": [height, width], "counts": bytes(r[i])}) for r in (x.rle, y.rle)]
                pixels.append(f"{i}: {int(np.count_nonzero(m[0] != m[1]))} pixels")
            except Exception as exc:  # noqa: BLE001 - a string that does not decode is the finding
                pixels.append(f"{i}: does not decode ({exc})")
        lines.append(f"image {k}: boxes differ in {len(boxes)}, scores in {len(scores)} (max diff "
                     f"{float(np.max(np.abs(x.scores - y.scores))) if len(x.scores) else 0:.3g}), strings in "
                     f"{len(strings)} of {len(x.scores)}; masks of the first: {', '.join(pixels) or '-'}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=12.0)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default="", help="a folder for the profile's trace")
    ap.add_argument("--option", default="input_graphs", choices=["input_graphs", "graph_masks"],
                    help="the boolean ENGINE_OPTION compared on and off")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (the same image repeated)")
    args = ap.parse_args()

    from bench_idle_gaps import timed
    from bench_serve import STEADY_FAST, make_model
    from dd.config import load_model_config
    from dd.png_rows import PngRows
    from dd.synth.scenes import generate_scene
    from dd.worker.engines import load_engine
    from dd.worker.engines.base import EngineInput

    h, w = 720, 1280
    scene = generate_scene(5000, w, h)
    cfg = load_model_config(make_model(Path(tempfile.mkdtemp(prefix="dd-ig-")), "fast", "r50", max(args.batch), h, w,
                                       100, 800, fast_options=STEADY_FAST))
    on, off = {"input_graphs": ("input graphs", "op by op"),
               "graph_masks": ("masks in the graph", "masks after the graph")}[args.option]
    engines = {}
    for label, opts in ((on, {}), (off, {args.option: False})):
        t0 = time.perf_counter()
        engines[label] = load_engine(dataclasses.replace(cfg, engine_options={**cfg.engine_options, **opts}),
                                     args.device)
        print(f"{label}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        assert engines[label]._graph_cache.wait_idle(300)  # no background capture beside the other engine
        if args.device.startswith("cuda"):
            import torch
            reserved = torch.cuda.memory_reserved() / 2**30
            print(f"{label}: GPU memory reserved by this process once this engine is loaded too: {reserved:.2f} GiB",
                  flush=True)
    items = {}
    for label, engine in engines.items():  # a mapping each: one mapping is page-locked once per process
        mm = mmap.mmap(-1, h * w * 3 + h * (1 + 2 * w) + h * w * 2)
        color = np.ndarray((h, w, 3), np.uint8, buffer=mm)
        color[:] = scene.color
        rows = np.ndarray((h, 1 + 2 * w), np.uint8, buffer=mm, offset=h * w * 3)
        rows[:, 0] = 0
        rows[:, 1:] = scene.depth.astype(">u2").view(np.uint8).reshape(h, 2 * w)
        depth = np.ndarray((h, w), np.uint16, buffer=mm, offset=h * w * 3 + rows.nbytes)
        depth[:] = scene.depth
        engine.prepare_input_memory(mm)
        for n in args.batch:
            items[(label, f"PNG rows x{n}")] = [EngineInput(color, PngRows(rows, h, w), cfg.score_threshold)] * n
            if args.option == "input_graphs":
                items[(label, f"raw x{n}")] = [EngineInput(color, depth, cfg.score_threshold)] * n
    for kind in sorted({k for _, k in items}):
        a, b = (engines[label].infer(items[(label, kind)]) for label in engines)
        same = all(np.array_equal(x.boxes, y.boxes) and np.array_equal(x.scores, y.scores) and x.rle == y.rle
                   for x, y in zip(a, b))
        print(f"depth as {kind}: the same answers both ways: {same} ({len(a[0].scores)} instances)", flush=True)
        if not same:
            print(differences(a, b, h, w), flush=True)
            return 1
    for label, engine in engines.items():
        print(f"{label}: batches whose masks were over the graph's capacity so far: "
              f"{getattr(engine, 'masks_over_capacity', 0)}", flush=True)
    for (label, _), item in items.items():
        timed(lambda: engines[label].infer(item), 20)
    ms: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for (label, kind), item in items.items():
            for gap in (0.0, args.gap_ms / 1e3):
                key = f"{kind} | {label} | {'back to back' if not gap else f'after {args.gap_ms:g} ms idle'}"
                sleep = (lambda s=gap: time.sleep(s)) if gap else None
                ms.setdefault(key, []).extend(timed(lambda: engines[label].infer(item), args.calls, sleep))
    print(f"\n## The engine, wall ms ({args.rounds} rounds x {args.calls} calls; median, p10-p90)\n")
    print(f"| depth, batch | {args.option} | calls | median | p10-p90 |\n|---|---|---|---|---|")
    for key, v in ms.items():
        kind, label, mode = key.split(" | ")
        q = np.percentile(v, [10, 50, 90])
        print(f"| {kind} | {label} | {mode} | {q[1]:.2f} | {q[0]:.2f}-{q[2]:.2f} |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, record_function

        out = Path(args.out or tempfile.mkdtemp(prefix="dd-ig-trace-"))
        out.mkdir(parents=True, exist_ok=True)
        rows_print = []
        for label, engine in engines.items():
            item = items[(label, f"PNG rows x{args.batch[0]}")]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for mode, gap in (("back to back", 0.0), ("after idle", args.gap_ms / 1e3)):
                    for i in range(20):
                        if gap:
                            time.sleep(gap)
                        with record_function(f"call|{mode}|{i}"):
                            engine.infer(item)
            trace = out / f"trace_{label.replace(' ', '_')}.json"
            prof.export_chrome_trace(str(trace))
            for mode, s in kernel_spans(trace, "call|").items():
                rows_print.append(f"| {label} | {mode} | " + " | ".join(f"{v:.0f}" for v in s.values()) + " |")
        print(f"\n## Depth as PNG rows, batch {args.batch[0]}, profiled (torch.profiler; medians of 20 calls, us)\n")
        print(f"| {args.option} | calls | kernels | GPU busy | span first kernel to last | GPU idle in the span |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows_print))
        print(f"\ntraces in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
