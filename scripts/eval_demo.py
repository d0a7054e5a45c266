#!/usr/bin/env python3
"""Evaluate served models on held-out generated scenes with pycocotools (mask and box AP).

Why through a running server and not in-process: the number we publish must be the one a user gets,
decoding, normalisation, thresholds, RLE encoding and all. Scenes come from dd.synth seeds
10_000_000 upward, which training (scripts/train_demo.py) never uses; each is sent the way
`python -m dd.synth` writes a data set (JPEG q95 colour, 16-bit PNG depth) unless --send raw.

    python scripts/eval_demo.py --start-server configs/models --model demo-rgbd --model demo-rgb --json ap.json
    python scripts/eval_demo.py --server localhost:50051 --model demo-rgbd --count 200
    python scripts/eval_demo.py --start-server configs/models --model demo-rgb --at 0.5 0.7 0.8 0.9
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from dd.client import DetectorClient  # noqa: E402
from dd.synth.scenes import CATEGORIES, generate_scene  # noqa: E402

EVAL_SEED_BASE = 10_000_000
METRICS = ("mask_AP", "mask_AP50", "mask_AP75", "box_AP", "box_AP50", "box_AP75")


def _encode(color: np.ndarray, depth: np.ndarray | None, send: str) -> tuple[Any, Any]:
    if send == "raw":
        return color, depth
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(color, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    png = None
    if depth is not None:
        ok, buf = cv2.imencode(".png", depth)
        if not ok:
            raise RuntimeError("PNG encoding failed")
        png = buf.tobytes()
    return jpg.tobytes(), png


def _coco_stats(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str, verbose: bool) -> list[float]:
    """COCOeval's 12 summary numbers; pycocotools prints a lot, shown only with --verbose."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not results:
            return [0.0] * 12
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        if verbose:
            print(f"--- {iou_type}")
        ev.summarize()
    return [max(0.0, float(v)) for v in ev.stats]  # -1 means "no such objects": report 0, never negative


def operating_point(gt_masks: list[list[dict]], dt_masks: list[list[tuple[float, dict]]], at: float) -> dict[str, Any]:
    """What a user of the model sees at score threshold `at`: mask precision, recall and F1 at IoU >= 0.5.

    AP cannot tell: it integrates over the whole ranking, so the threshold a model is served at
    (SCORE_THRESH_TEST) does not change it, but it decides how many false pieces and missed cartons
    come back. Detections are matched greedily by score, each to the unmatched ground truth it
    overlaps most, per image (gt_masks / dt_masks: one list of RLEs, or (score, RLE), per image).
    """
    from pycocotools import mask as mask_util

    tp = fp = fn = 0
    for gts, dts in zip(gt_masks, dt_masks):
        dts = sorted((d for d in dts if d[0] >= at), key=lambda d: -d[0])
        iou = np.asarray(mask_util.iou([r for _, r in dts], gts, [0] * len(gts))).reshape(len(dts), len(gts)) \
            if dts and gts else np.zeros((len(dts), len(gts)))
        used: set[int] = set()
        for k in range(len(dts)):
            free = [j for j in range(len(gts)) if j not in used]
            j = max(free, key=lambda j: iou[k, j], default=None)
            if j is not None and iou[k, j] >= 0.5:
                tp += 1
                used.add(j)
            else:
                fp += 1
        fn += len(gts) - len(used)
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    return {"score_threshold": at, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(1e-12, precision + recall), "false_positives": fp, "missed": fn}


def evaluate(target: str, model: str = "", *, count: int = 200, seed: int = EVAL_SEED_BASE, width: int = 640,
             height: int = 480, score_threshold: float = 0.05, send: str = "files", concurrency: int = 4,
             timeout: float = 120.0, verbose: bool = False, at: tuple[float, ...] = ()) -> dict[str, Any]:
    """Mask and box AP of one served model on `count` scenes (seeds seed ... seed+count-1), and the
    mask precision/recall/F1 at each score threshold in `at` (see operating_point).

    score_threshold defaults to COCO practice (0.05: AP integrates over the whole ranking); 0 lets
    the server use the model's own SCORE_THRESH_TEST.
    """
    from pycocotools import mask as mask_util

    with DetectorClient(target, timeout=timeout) as client:
        client.wait_ready(timeout=60.0)
        infos = client.list_models()
        info = next((m for m in infos if m.name == model), None) if model else \
            next((m for m in infos if m.is_default), infos[0] if infos else None)
        if info is None:
            raise SystemExit(f"{target} serves no model {model!r}; it serves: {', '.join(m.name for m in infos)}")
        name, kind = info.name, info.input_kind
        cat_ids = {n: i + 1 for i, n in enumerate(CATEGORIES)}

        def one(i: int) -> tuple[int, list[dict[str, Any]], Any, float]:
            sc = generate_scene(seed + i, width, height)
            anns = []
            if len(sc.masks):
                rles = mask_util.encode(np.asfortranarray(sc.masks.transpose(1, 2, 0).astype(np.uint8)))
                for m, box, rle in zip(sc.masks, sc.boxes, rles):
                    x1, y1, x2, y2 = (float(b) for b in box)
                    anns.append({"segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                                 "area": int(m.sum()), "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0,
                                 "category_id": cat_ids["carton"]})
            color, depth = _encode(sc.color, sc.depth if kind == "rgbd" else None, send)
            t = time.perf_counter()
            res = client.detect(color, depth, model=name, score_threshold=score_threshold)
            return i, anns, res, time.perf_counter() - t

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            done = list(pool.map(one, range(count)))
        wall = time.perf_counter() - t0

    images, gt_anns, segm, bbox, lat = [], [], [], [], []
    gt_rles: list[list[dict]] = []
    dt_rles: list[list[tuple[float, dict]]] = []
    unknown = 0
    for i, anns, res, dt in sorted(done, key=lambda d: d[0]):
        image_id = i + 1
        lat.append(dt)
        images.append({"id": image_id, "width": width, "height": height, "seed": seed + i})
        gt_rles.append([a["segmentation"] for a in anns])
        dt_rles.append([(float(inst.score), inst.rle) for inst in res.instances
                        if inst.rle is not None and inst.class_name in cat_ids])
        for a in anns:
            gt_anns.append(dict(a, id=len(gt_anns) + 1, image_id=image_id))
        for inst in res.instances:
            if inst.class_name not in cat_ids:
                unknown += 1
                continue
            x1, y1, x2, y2 = inst.box
            common = {"image_id": image_id, "category_id": cat_ids[inst.class_name], "score": float(inst.score)}
            bbox.append(dict(common, bbox=[x1, y1, x2 - x1, y2 - y1]))
            if inst.rle is not None:
                counts = inst.rle["counts"]
                segm.append(dict(common, segmentation={"size": list(inst.rle["size"]), "counts": counts.decode(
                    "ascii") if isinstance(counts, bytes) else counts}))
    gt = {"images": images, "annotations": gt_anns,
          "categories": [{"id": i, "name": n} for n, i in cat_ids.items()]}
    s_segm = _coco_stats(gt, segm, "segm", verbose)
    s_box = _coco_stats(gt, bbox, "bbox", verbose)
    lat_ms = np.asarray(lat) * 1000.0
    return {
        "model": name, "input_kind": kind, "scenes": count, "first_seed": seed, "width": width, "height": height,
        "score_threshold": score_threshold, "send": send, "ground_truth_instances": len(gt_anns),
        "detections": len(bbox), "detections_of_unknown_class": unknown,
        "mask_AP": s_segm[0], "mask_AP50": s_segm[1], "mask_AP75": s_segm[2],
        "box_AP": s_box[0], "box_AP50": s_box[1], "box_AP75": s_box[2],
        "latency_ms_p50": float(np.percentile(lat_ms, 50)) if len(lat_ms) else None,
        "latency_ms_p99": float(np.percentile(lat_ms, 99)) if len(lat_ms) else None,
        "images_per_s": count / wall if wall > 0 else None, "concurrency": concurrency,
        "operating_points": [operating_point(gt_rles, dt_rles, t) for t in at],
    }


@contextlib.contextmanager
def running_server(path: Path, log_hint: bool = True) -> Iterator[str]:
    """`deep-detection serve PATH` on a free loopback port for the duration; yields its target."""
    try:
        from tests.serverproc import ServerProcess
    except ImportError:  # an installed package without the tests folder
        ServerProcess = None
    if ServerProcess is not None:
        srv = ServerProcess(Path(path), frontends=1).start()
        try:
            srv.wait_serving(timeout=300.0)
            yield srv.target
        except BaseException:
            if log_hint:
                print(f"server log: {srv.log_path}", file=sys.stderr)
            raise
        finally:
            srv.stop()
        return
    yield from _inline_server(Path(path))


def _inline_server(path: Path) -> Iterator[str]:
    import signal
    import socket
    import subprocess
    import tempfile

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="dd-eval-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "dd", "serve", str(path), "--host", "127.0.0.1", "--port",
                             str(port), "--frontends", "1", "--metrics-port", "0"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        end = time.monotonic() + 300.0
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; log: {log.name}")
            with grpc.insecure_channel(target) as ch:
                try:
                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                except grpc.RpcError:
                    status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            if time.monotonic() > end:
                raise TimeoutError(f"server not serving after 300 s; log: {log.name}")
            time.sleep(0.2)
        yield target
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def print_table(results: list[dict[str, Any]]) -> None:
    r0 = results[0]
    print(f"\n{r0['scenes']} held-out scenes (seeds {r0['first_seed']}..{r0['first_seed'] + r0['scenes'] - 1}, "
          f"{r0['width']}x{r0['height']}, sent as {r0['send']}), score >= {r0['score_threshold']:g}, pycocotools\n")
    head = f"{'model':<16} {'input':<5} {'mask AP':>8} {'AP50':>6} {'AP75':>6} {'box AP':>8} {'AP50':>6} {'AP75':>6}" \
           f" {'p50 ms':>7} {'img/s':>6}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['model']:<16} {r['input_kind']:<5} {r['mask_AP']:8.3f} {r['mask_AP50']:6.3f} {r['mask_AP75']:6.3f} "
              f"{r['box_AP']:8.3f} {r['box_AP50']:6.3f} {r['box_AP75']:6.3f} {r['latency_ms_p50']:7.1f} "
              f"{r['images_per_s']:6.1f}")
    points = [(r["model"], op) for r in results for op in r.get("operating_points", [])]
    if points:
        print(f"\n{'model':<16} {'score >=':>8} {'precision':>9} {'recall':>6} {'F1':>6} {'false':>6} {'missed':>6}"
              "   (masks, IoU >= 0.5)")
        for name, op in points:
            print(f"{name:<16} {op['score_threshold']:8.2f} {op['precision']:9.3f} {op['recall']:6.3f} "
                  f"{op['f1']:6.3f} {op['false_positives']:6d} {op['missed']:6d}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default=None, help="HOST:PORT of a running server (default localhost:50051)")
    where.add_argument("--start-server", type=Path, default=None, metavar="MODEL_FOLDER_OR_REPO",
                       help="start `deep-detection serve` on this path on a free port, stop it afterwards")
    p.add_argument("--model", action="append", default=None,
                   help="model name; repeat to compare several (default: the server's default model)")
    p.add_argument("--count", type=int, default=200, help="held-out scenes")
    p.add_argument("--seed", type=int, default=EVAL_SEED_BASE, help="first scene seed (training uses lower ones)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--score-threshold", type=float, default=0.05, help="0: each model's SCORE_THRESH_TEST")
    p.add_argument("--send", choices=("files", "raw"), default="files",
                   help="files: JPEG q95 + 16-bit PNG as dd.synth writes them; raw: uncompressed arrays")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--at", type=float, nargs="+", default=[], metavar="T",
                   help="also report mask precision/recall/F1 (IoU >= 0.5) of the detections scoring >= T, "
                        "for each T: what a model served with SCORE_THRESH_TEST = T returns (AP does not change)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--verbose", action="store_true", help="show pycocotools' full summaries")
    args = p.parse_args(argv)
    if args.seed < EVAL_SEED_BASE:
        print(f"warning: seeds below {EVAL_SEED_BASE} may have been used for training", file=sys.stderr)
    models = args.model or [""]

    def run(target: str) -> list[dict[str, Any]]:
        out = []
        for m in models:
            out.append(evaluate(target, m, count=args.count, seed=args.seed, width=args.width, height=args.height,
                                score_threshold=args.score_threshold, send=args.send, concurrency=args.concurrency,
                                verbose=args.verbose, at=tuple(args.at)))
        return out

    if args.start_server is not None:
        print(f"starting deep-detection serve {args.start_server} ...", flush=True)
        with running_server(args.start_server) as target:
            results = run(target)
        server = f"started on {args.start_server}"
    else:
        results = run(args.server or "localhost:50051")
        server = args.server or "localhost:50051"
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"server": server, "results": results,
                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
        print(f"\nwritten {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
