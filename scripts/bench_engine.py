#!/usr/bin/env python3
"""Engine benchmark: torchvision eager fp32, eager fp16 (autocast) and the fast path, side by side.

One table, one run: R50-FPN Mask R-CNN with fixed random weights (91 classes,
box score threshold 0 so every image keeps its maximum detections), 1280x720
inputs (synthetic scenes; RGB, or RGB-D with --input-kind rgbd), shorter side
800 and 416, batch 1/4/8, 20 and 100 detections; p50/p99 ms per batch and
images/s, warm-up excluded. Engines: eager-fp32, eager-fp16, fast (one CUDA
graph), fast-dynamic (the fast engine's op-by-op path, fixed_shapes false) and
onnxruntime (the same weights exported with `deep-detection export --format onnx
--dynamic` at the canvas of the input size, run by ENGINE onnxruntime with
--ort-provider: CUDA with onnxruntime-gpu; what a user would pick instead of fast).

Eager rows time model(images) on the GPU, masks pasted to full-image tensors
(as torchvision returns them), synchronised; the fast rows time the whole
engine call, which also returns COCO RLE on the host: strictly more work.
With --check, the fast path's (and onnxruntime's, when run) answers are compared
with eager fp32 on the same images (matched instances, box IoU, scores, mask IoU),
counted as scripts/fast_eager_check.py counts them: both ways (an instance only
one side returns is unmatched), a match needing box IoU >= 0.98 and mask IoU >=
0.95, at the model's score threshold; a summary line per size gives matched /
total and PASS/FAIL against issue #18's >= 99%. The check uses 4 of the timing
scenes, or with --check-scenes N, N held-out scenes (seeds from --check-seed,
10_000_000: never train_demo.py's training seeds) at the input size. For a
trained model, scripts/check_trained_r50.sh trains one and runs the check alone.

--model FOLDER times and checks a model folder instead (its own min size is
replaced by each --sizes value, its detections per image by each --dets
value): eager is the folder's own reference engine (dd.worker.engines), so a
detectron2 folder (checkpoint + YAML) is timed and checked against the
detectron2 eager engine; as that engine has no separate network call, its
eager-fp32 rows time the whole engine call (host pre/post-processing and
full-image masks included) and eager-fp16 is skipped.

    python scripts/bench_engine.py --json $OUT/engine.json
    python scripts/bench_engine.py --engines fast onnxruntime --check   # ONNX Runtime (CUDA) against fast
    python scripts/bench_engine.py --model /tmp/d2rgbd --sizes 640 --dets 100 --engines eager-fp32 fast --check
    python scripts/bench_engine.py --model OUT/model --sizes 512 --batches 1 --engines eager-fp32 fast --check \
        --check-scenes 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fast_eager_check import HELD_OUT_SEED, Thresholds, match_image, summarize  # noqa: E402  (beside this file)

from dd.config import DEFAULT_ARCHITECTURE, load_model_config  # noqa: E402
from dd.models.model_folder import random_model_folder  # noqa: E402
from dd.synth.scenes import generate_scene  # noqa: E402
from dd.worker.engines import create_engine  # noqa: E402
from dd.worker.engines.base import EngineInput  # noqa: E402
from dd.worker.engines.fast.engine import FastMaskRCNN, padded, resized_size  # noqa: E402
from dd.worker.engines.torchvision_maskrcnn import TorchvisionMaskRCNN  # noqa: E402


def timeit(fn, seconds: float, min_iters: int = 10, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 2000:
            break
    return times


def page_locked(arr: np.ndarray | None) -> np.ndarray | None:
    """A copy of arr in page-locked host memory: the worker's inputs live in a shared-memory ring
    registered with CUDA, so its copies to the GPU are DMA; pageable arrays would time a staging
    copy the service does not make."""
    if arr is None:
        return None
    out = torch.empty(arr.shape, dtype=torch.from_numpy(arr[:0]).dtype, pin_memory=True)
    out.numpy()[...] = arr
    return out.numpy()


def compare(ref, fast, h: int, w: int) -> dict[str, float]:
    """One image, matched as scripts/fast_eager_check.py matches (both ways; box IoU >= 0.98 and mask IoU >= 0.95).

    The earlier greedy loop here counted only the reference's side (an instance only the fast path returned,
    or any answer on an image where the reference found nothing, went unseen) and never applied a mask IoU
    bound. matched_frac is now matched / (ref + fast - matched); the IoU and score figures are over all
    same-class pairs with box IoU >= 0.5, near misses included. "image" holds the raw match for summarize().
    """
    image = match_image(ref, fast, h, w)
    pairs = image["pairs"]
    total = image["eager"] + image["fast"] - image["matched"]
    return {"ref": image["eager"], "fast": image["fast"], "matched": image["matched"],
            "matched_frac": image["matched"] / total if total else 1.0,
            "ref_only": len(image["eager_unmatched_scores"]), "fast_only": len(image["fast_unmatched_scores"]),
            "min_box_iou": min((p["box_iou"] for p in pairs), default=0.0),
            "max_score_diff": max((p["score_diff"] for p in pairs), default=0.0),
            "min_mask_iou": min((p["mask_iou"] for p in pairs), default=0.0),
            "mean_mask_iou": float(np.mean([p["mask_iou"] for p in pairs])) if pairs else 0.0,
            "image": image}


def onnxruntime_engine(cfg, folder: Path, tmp: Path, height: int, width: int, provider: str):  # noqa: ANN001, ANN201
    """The model of `folder` exported (dynamic batch, the canvas of a height x width input at cfg's sizes) and
    loaded by ENGINE onnxruntime on GPU 0."""
    from dd.export.onnx_export import export_model
    from dd.worker.engines.onnxruntime import OnnxRuntimeMaskRCNN

    rh, rw = resized_size(height, width, cfg.min_size, cfg.max_size)
    out = tmp / f"onnx-{folder.name}-{cfg.min_size}"
    export_model(folder, out, size=(padded(rh), padded(rw)), dynamic=True, check=False)
    ecfg = dataclasses.replace(load_model_config(out), min_size=cfg.min_size, max_size=cfg.max_size,
                               score_threshold=cfg.score_threshold, engine_options={"provider": provider})
    engine = OnnxRuntimeMaskRCNN(ecfg, "cuda:0")
    engine.load()
    return engine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[800, 416])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--dets", type=int, nargs="+", default=[100, 20])
    ap.add_argument("--engines", nargs="+", default=["eager-fp32", "eager-fp16", "fast"],
                    help="eager-fp32, eager-fp16, fast (fixed shapes, one graph), fast-dynamic (op by op), "
                         "onnxruntime (an export run by ONNX Runtime)")
    ap.add_argument("--ort-provider", default="cuda", choices=["cuda", "cpu", "auto"],
                    help="onnxruntime's provider (cuda needs onnxruntime-gpu)")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per row (after warm-up)")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--check", action="store_true", help="compare fast vs eager fp32 answers")
    ap.add_argument("--check-scenes", type=int, default=0,
                    help="check on this many held-out scenes (seeds from --check-seed) instead of 4 timing scenes")
    ap.add_argument("--check-seed", type=int, default=HELD_OUT_SEED,
                    help="first held-out scene seed (train_demo.py trains below 10_000_000)")
    ap.add_argument("--model", help="a model folder to use instead of random R50-FPN weights (torchvision or "
                    "detectron2 format; eager is the folder's own reference engine)")
    ap.add_argument("--profile", help="write torch.profiler tables of the fast path (batch 1 and the largest) here")
    ap.add_argument("--input-kind", default="rgb", choices=["rgb", "rgbd"], help="random model's input")
    ap.add_argument("--fast-options", default="{}", help="ENGINE_OPTIONS for the fast engine, as JSON")
    ap.add_argument("--pageable", action="store_true",
                    help="feed the fast engine pageable numpy arrays (default: page-locked ones, as the worker's "
                         "shared-memory ring is registered with CUDA)")
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_engine.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.cuda.get_device_name(0)
    print(f"device: {dev}; torch {torch.__version__}", flush=True)
    scenes = [generate_scene(1000 + k, args.width, args.height) for k in range(8)]
    if not args.pageable:
        scenes = [dataclasses.replace(s, color=page_locked(s.color), depth=page_locked(s.depth)) for s in scenes]
    tmp = Path(tempfile.mkdtemp())
    rows, checks, stages, check_summaries = [], [], {}, []
    if args.check_scenes > 0:
        check_scenes = [generate_scene(args.check_seed + k, args.width, args.height) for k in range(args.check_scenes)]
        check_seeds = [args.check_seed, args.check_seed + args.check_scenes - 1]
    else:  # the first 4 timing scenes, as before
        check_scenes, check_seeds = scenes[:4], [1000, 1003]
    for size in args.sizes:
        for dets in args.dets:
            if args.model:
                folder = Path(args.model)
            else:
                folder = tmp / f"r50-{size}-{dets}"
                random_model_folder(folder, input_kind=args.input_kind, seed=0, categories=[f"c{i}" for i in range(1, 91)],
                                    architecture=dict(DEFAULT_ARCHITECTURE, max_detections=dets), min_size=size,
                                    max_size=1333, score_threshold=0.0,
                                    extra={"ENGINE": "fast",  # its options are checked against the engine named
                                           "ENGINE_OPTIONS": {"warmup_sizes": [[args.height, args.width]],
                                                              **json.loads(args.fast_options)},
                                           "MAX_BATCH_SIZE": max(args.batches)})
            cfg = load_model_config(folder)
            if args.model:  # as the random folder above: graphs captured at load for the timed size and batches
                cfg = dataclasses.replace(cfg, max_batch_size=max(args.batches), engine_options={
                    **cfg.engine_options, "warmup_sizes": [[args.height, args.width]], **json.loads(args.fast_options)})
            if args.model and cfg.detectron2 is not None:
                # the YAML decides the network: its detections per image, its MAX_SIZE_TEST
                cfg = dataclasses.replace(cfg, min_size=size, architecture=dict(cfg.architecture, max_detections=dets),
                                          detectron2=dataclasses.replace(cfg.detectron2, detections_per_image=dets))
            elif args.model:
                cfg = dataclasses.replace(cfg, min_size=size, max_size=1333,
                                          architecture=dict(cfg.architecture, max_detections=dets))
            # The folder's eager reference engine: torchvision's, or detectron2's for detectron2 weights.
            eager = create_engine(dataclasses.replace(cfg, engine="torchvision"), "cuda:0")
            eager.load()
            whole_call = not isinstance(eager, TorchvisionMaskRCNN)  # no separate network call to time
            if not whole_call:
                eager.model.roi_heads.score_thresh = cfg.score_threshold
            fast = None
            if "fast" in args.engines or args.check or args.profile:
                fast = FastMaskRCNN(cfg, "cuda:0")
                fast.load()
                # the canvases beyond the warm-up size's are captured by a background thread right after load:
                # timed rows must not share the GPU with it
                if not fast._graph_cache.wait_idle(600):
                    raise SystemExit("the fast engine's background captures did not finish in 600 s")
            dynamic = None
            if "fast-dynamic" in args.engines:
                opts = dict(cfg.engine_options, fixed_shapes=False)
                dynamic = FastMaskRCNN(dataclasses.replace(cfg, engine_options=opts), "cuda:0")
                dynamic.load()
            ort = None
            if "onnxruntime" in args.engines:
                ort = onnxruntime_engine(cfg, folder, tmp, args.height, args.width, args.ort_provider)
            for batch in args.batches:
                inputs = [EngineInput(s.color, None if cfg.input_kind == "rgb" else s.depth, cfg.score_threshold)
                          for s in (scenes[k % len(scenes)] for k in range(batch))]
                assert len(inputs) == batch
                # 3 or 4 channels, as the engine feeds the model
                tensors = None if whole_call else [eager._tensor(x) for x in inputs]
                for name in args.engines:
                    if name == "eager-fp32" and whole_call:
                        fn = lambda: eager.infer(inputs)  # noqa: E731
                    elif name == "eager-fp32":
                        fn = lambda: eager.model(tensors)  # noqa: E731
                    elif name == "eager-fp16" and whole_call:
                        print(f"eager-fp16 skipped: the {eager.name} engine has no separate network call", flush=True)
                        continue
                    elif name == "eager-fp16":
                        def fn():
                            with torch.autocast("cuda", dtype=torch.float16):
                                return eager.model(tensors)
                    elif name == "fast":
                        fn = lambda: fast.infer(inputs)  # noqa: E731
                    elif name == "fast-dynamic":
                        fn = lambda: dynamic.infer(inputs)  # noqa: E731
                    elif name == "onnxruntime":
                        fn = lambda: ort.infer(inputs)  # noqa: E731
                    else:
                        raise SystemExit(f"unknown engine {name}")
                    with torch.inference_mode():
                        t = timeit(fn, args.seconds)
                        out = fn()
                    n_det = len(out[0]["scores"]) if isinstance(out[0], dict) else len(out[0].scores)
                    row = {"engine": name + (" (engine call)" if name.startswith("eager") and whole_call else ""),
                           "eager_engine": eager.name, "shorter_side": size, "detections": dets, "batch": batch,
                           "kept": n_det, "p50_ms": float(np.percentile(t, 50)),
                           "p99_ms": float(np.percentile(t, 99)), "iters": len(t),
                           "images_per_s": batch * 1000.0 / float(np.mean(t))}
                    if name.startswith("fast"):
                        engine = fast if name == "fast" else dynamic
                        row["redone_images"] = engine.redone_images
                        engine.redone_images = 0
                    rows.append(row)
                    print(f"{name:>10} side {size:4d} dets {dets:3d} batch {batch}: p50 {row['p50_ms']:7.2f} ms  "
                          f"p99 {row['p99_ms']:7.2f} ms  {row['images_per_s']:7.1f} img/s  (kept {n_det}"
                          f"{', redone ' + str(row['redone_images']) if 'redone_images' in row else ''})",
                          flush=True)
            if fast is None:
                del eager, dynamic
                torch.cuda.empty_cache()
                continue
            # Where the fast path's time goes, at batch 1 and the largest batch.
            def scene_inputs(batch: int) -> list[EngineInput]:
                return [EngineInput(s.color, None if cfg.input_kind == "rgb" else s.depth, cfg.score_threshold)
                        for s in (scenes[k % len(scenes)] for k in range(batch))]

            for batch in sorted({1, max(args.batches)}):
                fast.stage_times = {}
                for _ in range(20):
                    fast.infer(scene_inputs(batch))
                stages[f"{size}/{dets} batch {batch}"] = {k: float(np.median(v)) for k, v in fast.stage_times.items()}
            fast.stage_times = None
            if args.check:
                if not whole_call:
                    eager.model.roi_heads.score_thresh = cfg.score_threshold
                matched_images: dict[str, list] = {"fast": [], "onnxruntime": []}
                for s in check_scenes:
                    item = EngineInput(s.color, None if cfg.input_kind == "rgb" else s.depth, cfg.score_threshold)
                    ref = eager.infer([item])[0]
                    for name, engine in (("fast", fast), ("onnxruntime", ort)):
                        if engine is None:
                            continue
                        c = compare(ref, engine.infer([item])[0], args.height, args.width)
                        matched_images[name].append(c.pop("image"))
                        if args.check_scenes <= 0:  # per-image lines only for the 4 scenes of old
                            checks.append({**({"engine": name} if name != "fast" else {}), "shorter_side": size,
                                           "detections": dets, **c})
                for name, images in matched_images.items():
                    if images:
                        summ = summarize(images, Thresholds())
                        check_summaries.append({"engine": name, "shorter_side": size, "detections": dets,
                                                "score_threshold": cfg.score_threshold, "seeds": check_seeds,
                                                **summ, "per_image": images})
                # The fast backbone (batch norm folded, ReLUs fused, fp16, channels-last) against eager fp32's,
                # on the same normalised image: relative error per FPN level.
                with torch.inference_mode():
                    x = fast._normalize(torch.from_numpy(scenes[0].color).cuda()[None],
                                        None if cfg.input_kind == "rgb" else
                                        torch.from_numpy(scenes[0].depth).cuda()[None],
                                        *fast.semantics.resized_size(args.height, args.width, cfg.min_size,
                                                                     cfg.max_size))
                    ref = eager.model.backbone(x.float().contiguous())
                    got = fast.model.backbone(x)
                    checks.append({"shorter_side": size, "detections": dets, **{
                        f"backbone_rel_err_{k}": float((got[k].float() - ref[k]).norm() / ref[k].norm()) for k in ref}})
            if args.profile and size == args.sizes[0] and dets == args.dets[0]:
                from torch.profiler import ProfilerActivity, profile

                tables = []
                for batch in sorted({1, max(args.batches)}):
                    items = scene_inputs(batch)
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(10):
                            fast.infer(items)
                        torch.cuda.synchronize()
                    tables.append(f"# batch {batch}, 10 calls\n\n"
                                  + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30) + "\n\n"
                                  + prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
                # The graph's kernels again, launched op by op, so each is attributed to the operator
                # (and input shapes) that launched it.
                g = fast._fixed_graph(max(args.batches), fast.canvas_for([(args.height, args.width)]))
                with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                                     record_shapes=True) as prof:
                    for _ in range(3):
                        fast._fixed_forward(g.x, g.sizes, g.threshold)
                    torch.cuda.synchronize()
                tables.append(f"# batch {max(args.batches)}, the network op by op (3 calls), by operator and shapes\n\n"
                              + prof.key_averages(group_by_input_shape=True).table(
                                  sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=40,
                                  max_shapes_column_width=90))
                Path(args.profile).write_text("\n\n".join(tables))
            del eager, fast, dynamic
            torch.cuda.empty_cache()

    print(f"\n## Engine latency, {dev}, {args.width}x{args.height} input\n")
    print("| engine | shorter side | detections | batch | p50 ms/batch | p99 ms/batch | images/s | images redone |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['shorter_side']} | {r['detections']} | {r['batch']} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['images_per_s']:.0f} | {r.get('redone_images', '')} |")
    print("\nfast path, median ms per stage (synchronised between stages):")
    for k, v in stages.items():
        print(f"  {k}: " + ", ".join(f"{s} {t:.2f}" for s, t in v.items()))
    if checks:
        print("\nfast vs eager fp32 answers:")
        for c in checks:
            print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()))
    if check_summaries:
        print("\nmatched instances (both ways; box IoU >= 0.98 and mask IoU >= 0.95; >= 99% to pass):")
        for c in check_summaries:
            b, m = c["box_iou"], c["mask_iou"]
            print(f"  {c['engine']} side {c['shorter_side']} dets {c['detections']}: {c['images']} scenes (seeds "
                  f"{c['seeds'][0]}..{c['seeds'][1]}), score threshold {c['score_threshold']}: matched "
                  f"{c['matched']}/{c['total_instances']} = {c['matched_frac']:.2%} (eager-only {c['eager_unmatched']}, "
                  f"{c['engine']}-only {c['fast_unmatched']}); box IoU min {b['min'] if b else float('nan'):.4f} "
                  f"p1 {b['p1'] if b else float('nan'):.4f}; mask IoU min {m['min'] if m else float('nan'):.4f} "
                  f"p1 {m['p1'] if m else float('nan'):.4f}; max score diff {c['max_score_diff'] or 0.0:.4f}: "
                  f"{c['verdict']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "torch": torch.__version__, "rows": rows,
                                               "stages": stages, "checks": checks,
                                               "check_summaries": check_summaries}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
