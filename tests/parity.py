"""Do two detectors give the same answers? The parity bounds of issue #13, as one reusable measure.

Why a module of its own: the same measure decides whether the CPU engine answers as detectron2 does
(tests/integration/test_detectron2_parity.py, against the stored answers in tests/fixtures/detectron2/) and whether
the fast GPU engine answers as the CPU path does (run on a GPU machine: `python -m tests.parity --help`).

How detections are paired: per image, the reference's detections in order of falling score each take
the candidate's unpaired detection of the same class with the highest box IoU, if that IoU is at least
`match_iou` (greedy, as COCO evaluation pairs). The bounds (Bounds) then ask, over all images:
  - at least `min_matched` of the reference's detections paired;
  - none of the reference's confident detections (score >= threshold + `confident_margin`) unpaired,
    and, the other way round, none of the candidate's confident ones unpaired either (an engine that
    adds a confident detection the reference does not have is as wrong as one that misses one);
  - the 99th percentile of |corner difference| over all paired boxes' coordinates <= `max_corner_p99_px`;
  - every paired |score difference| <= `max_score_diff`;
  - mean mask IoU of the paired detections >= `min_mask_iou`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_util

REPO = Path(__file__).resolve().parent.parent
DETECTRON2_FIXTURES = REPO / "tests" / "fixtures" / "detectron2"


@dataclass(frozen=True)
class Bounds:
    match_iou: float = 0.9
    min_matched: float = 0.97
    confident_margin: float = 0.05
    max_corner_p99_px: float = 1.0
    max_score_diff: float = 0.01
    min_mask_iou: float = 0.95


@dataclass
class Dets:
    """One image's detections, whoever made them. labels: any class numbering, the same on both sides
    (the server's 1-based class_id here); masks: COCO RLE dicts ({"size": [h, w], "counts": ...}) or None."""

    boxes: np.ndarray  # N x 4 float64, x1 y1 x2 y2, input image pixels
    scores: np.ndarray  # N float64
    labels: np.ndarray  # N int64
    masks: list[dict[str, Any]] | None
    height: int
    width: int

    def __len__(self) -> int:
        return len(self.scores)


def _rle(mask: np.ndarray) -> dict[str, Any]:
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


def from_expected(entry: dict[str, Any]) -> Dets:
    """One image of an expected.json (scripts/make_detectron2_fixtures.py): detectron2's answers."""
    d = entry["detections"]
    masks = [{"size": list(m["size"]), "counts": m["counts"].encode("ascii")} for m in d["masks"]]
    return Dets(np.asarray(d["boxes"], np.float64).reshape(-1, 4), np.asarray(d["scores"], np.float64),
                np.asarray(d["class_ids"], np.int64), masks, int(entry["height"]), int(entry["width"]))


def from_engine(det: Any, height: int, width: int) -> Dets:
    """dd.worker.engines.base.Detections (full-image boolean masks, or RLE counts in det.rle)."""
    if det.rle is not None:
        masks: list[dict[str, Any]] | None = [{"size": [height, width], "counts": c} for c in det.rle]
    elif det.masks is not None:
        masks = [_rle(m) for m in np.asarray(det.masks)]
    else:
        masks = None
    return Dets(np.asarray(det.boxes, np.float64).reshape(-1, 4), np.asarray(det.scores, np.float64),
                np.asarray(det.labels, np.int64), masks, height, width)


def from_result(result: Any) -> Dets:
    """dd.client.api.Result, as a client gets it from the server."""
    inst = result.instances
    masks = None
    if inst and all(i.rle is not None for i in inst):
        masks = [{"size": list(i.rle["size"]), "counts": i.rle["counts"]} for i in inst]
    elif not inst:
        masks = []
    return Dets(np.asarray([i.box for i in inst], np.float64).reshape(-1, 4),
                np.asarray([i.score for i in inst], np.float64), np.asarray([i.class_id for i in inst], np.int64),
                masks, int(result.height), int(result.width))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (len(a) x len(b)) of x1 y1 x2 y2 boxes, continuous coordinates."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match(ref: Dets, cand: Dets, match_iou: float) -> list[tuple[int, int]]:
    """Greedy pairing: reference by falling score, each to the best unpaired same-class candidate."""
    iou = box_iou(ref.boxes, cand.boxes)
    same = ref.labels[:, None] == cand.labels[None, :]
    iou = np.where(same, iou, -1.0)
    taken = np.zeros(len(cand), bool)
    pairs = []
    for i in np.argsort(-ref.scores, kind="stable"):
        if len(cand) == 0:
            break
        row = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(row))
        if row[j] >= match_iou:
            taken[j] = True
            pairs.append((int(i), j))
    return pairs


def _mask_ious(ref: Dets, cand: Dets, pairs: Sequence[tuple[int, int]]) -> list[float]:
    if ref.masks is None or cand.masks is None or not pairs:
        return []
    out = []
    for i, j in pairs:
        a, b = ref.masks[i], cand.masks[j]
        if list(a["size"]) != list(b["size"]):
            out.append(0.0)  # a mask of the wrong size matches nothing
            continue
        area_a, area_b = mask_util.area(a), mask_util.area(b)
        if area_a == 0 and area_b == 0:
            out.append(1.0)
            continue
        out.append(float(mask_util.iou([b], [a], [0])[0][0]))
    return out


def compare(reference: Sequence[Dets], candidate: Sequence[Dets], score_threshold: float | Sequence[float],
            bounds: Bounds = Bounds(), names: Sequence[str] | None = None) -> dict[str, Any]:
    """The parity metrics of two detectors over the same images (lists in the same image order).

    score_threshold: the threshold both ran with (one, or one per image): what "confident" is measured
    from. Returns a JSON-able dict; failures(metrics) says which bounds it breaks.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference images but {len(candidate)} candidate images")
    thresholds = ([float(score_threshold)] * len(reference) if np.isscalar(score_threshold)
                  else [float(t) for t in score_threshold])  # type: ignore[union-attr]
    names = list(names) if names is not None else [str(k) for k in range(len(reference))]
    corner_dev: list[np.ndarray] = []
    score_dev: list[np.ndarray] = []
    mask_iou: list[float] = []
    n_ref = n_cand = n_pairs = 0
    ref_conf_missed: list[dict[str, Any]] = []
    cand_conf_extra: list[dict[str, Any]] = []
    per_image = []
    for name, ref, cand, thr in zip(names, reference, candidate, thresholds):
        if (ref.height, ref.width) != (cand.height, cand.width):
            raise ValueError(f"image {name}: reference is {ref.width}x{ref.height}, "
                             f"candidate {cand.width}x{cand.height}")
        pairs = match(ref, cand, bounds.match_iou)
        ri = np.asarray([p[0] for p in pairs], np.int64)
        ci = np.asarray([p[1] for p in pairs], np.int64)
        corner_dev.append(np.abs(ref.boxes[ri] - cand.boxes[ci]).reshape(-1))
        score_dev.append(np.abs(ref.scores[ri] - cand.scores[ci]))
        ious = _mask_ious(ref, cand, pairs)
        mask_iou += ious
        confident = thr + bounds.confident_margin
        unpaired_ref = sorted(set(range(len(ref))) - set(ri.tolist()))
        unpaired_cand = sorted(set(range(len(cand))) - set(ci.tolist()))
        for i in unpaired_ref:
            if ref.scores[i] >= confident:
                ref_conf_missed.append({"image": name, "label": int(ref.labels[i]), "score": float(ref.scores[i]),
                                        "box": [round(float(v), 2) for v in ref.boxes[i]]})
        for j in unpaired_cand:
            if cand.scores[j] >= confident:
                cand_conf_extra.append({"image": name, "label": int(cand.labels[j]), "score": float(cand.scores[j]),
                                        "box": [round(float(v), 2) for v in cand.boxes[j]]})
        n_ref += len(ref)
        n_cand += len(cand)
        n_pairs += len(pairs)
        per_image.append({"image": name, "reference": len(ref), "candidate": len(cand), "matched": len(pairs),
                          "mask_iou_mean": float(np.mean(ious)) if ious else None})
    corners = np.concatenate(corner_dev) if corner_dev else np.zeros(0)
    scores = np.concatenate(score_dev) if score_dev else np.zeros(0)
    return {
        "images": len(reference),
        "reference_detections": n_ref,
        "candidate_detections": n_cand,
        "matched": n_pairs,
        "matched_fraction": n_pairs / n_ref if n_ref else 1.0,
        "reference_confident_unmatched": ref_conf_missed,
        "candidate_confident_unmatched": cand_conf_extra,
        # None where nothing was paired (no deviation to measure; matched_fraction says the rest)
        "box_corner_dev_p99_px": float(np.percentile(corners, 99)) if len(corners) else None,
        "box_corner_dev_max_px": float(corners.max()) if len(corners) else None,
        "score_diff_max": float(scores.max()) if len(scores) else None,
        "score_diff_mean": float(scores.mean()) if len(scores) else None,
        "mask_iou_mean": float(np.mean(mask_iou)) if mask_iou else None,
        "mask_iou_min": float(np.min(mask_iou)) if mask_iou else None,
        "masks_compared": bool(mask_iou) or n_pairs == 0,
        "per_image": per_image,
        "bounds": dataclasses.asdict(bounds),
    }


def failures(metrics: dict[str, Any]) -> list[str]:
    """The bounds that metrics (from compare) break, one line each; empty when parity holds."""
    b = Bounds(**metrics["bounds"])
    out = []
    if metrics["matched_fraction"] < b.min_matched:
        out.append(f"matched {metrics['matched']}/{metrics['reference_detections']} of the reference's detections "
                   f"({metrics['matched_fraction']:.3f} < {b.min_matched})")
    if metrics["reference_confident_unmatched"]:
        out.append(f"{len(metrics['reference_confident_unmatched'])} confident reference detections unmatched: "
                   f"{metrics['reference_confident_unmatched'][:3]}")
    if metrics["candidate_confident_unmatched"]:
        out.append(f"{len(metrics['candidate_confident_unmatched'])} confident candidate detections the reference "
                   f"does not have: {metrics['candidate_confident_unmatched'][:3]}")
    p99, score, miou = metrics["box_corner_dev_p99_px"], metrics["score_diff_max"], metrics["mask_iou_mean"]
    if p99 is not None and p99 > b.max_corner_p99_px:
        out.append(f"p99 box corner deviation {p99:.3f} px > {b.max_corner_p99_px}")
    if score is not None and score > b.max_score_diff:
        out.append(f"max score difference {score:.4f} > {b.max_score_diff}")
    if not metrics["masks_compared"]:
        out.append("masks missing on one side")
    elif miou is not None and miou < b.min_mask_iou:
        out.append(f"mean mask IoU {miou:.4f} < {b.min_mask_iou}")
    return out


def summary(metrics: dict[str, Any]) -> str:
    """One line for logs and assertion messages."""
    def num(key: str, fmt: str) -> str:
        return "n/a" if metrics[key] is None else format(metrics[key], fmt)

    return (f"{metrics['images']} images: matched {metrics['matched']}/{metrics['reference_detections']} "
            f"(candidate has {metrics['candidate_detections']}), confident unmatched "
            f"{len(metrics['reference_confident_unmatched'])} ref / "
            f"{len(metrics['candidate_confident_unmatched'])} cand, "
            f"box corner p99 {num('box_corner_dev_p99_px', '.3f')} px (max {num('box_corner_dev_max_px', '.3f')}), "
            f"score diff max {num('score_diff_max', '.4f')}, mask IoU mean {num('mask_iou_mean', '.4f')} "
            f"(min {num('mask_iou_min', '.4f')})")


# ----------------------------------------------------------------------------- images and engines


@dataclass
class Image:
    """One test image as the server receives it: RGB uint8 colour, uint16 millimetre depth (or None)."""

    name: str
    color: np.ndarray
    depth: np.ndarray | None
    color_file: Path | None = None
    depth_file: Path | None = None
    expected: dict[str, Any] | None = field(default=None, repr=False)


def read_png_pair(color_file: Path, depth_file: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    import cv2

    bgr = cv2.imread(str(color_file), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read {color_file}")
    depth = None
    if depth_file is not None:
        depth = cv2.imread(str(depth_file), cv2.IMREAD_UNCHANGED)
        if depth is None or depth.dtype != np.uint16:
            raise ValueError(f"{depth_file}: not a 16-bit PNG")
    return np.ascontiguousarray(bgr[..., ::-1]), depth


def expected_images(folder: Path) -> tuple[dict[str, Any], list[Image]]:
    """A fixture folder's expected.json and its images (paths in it are relative to the folder)."""
    expected = json.loads((folder / "expected.json").read_text())
    images = []
    for entry in expected["images"]:
        cf = folder / entry["color"]
        df = folder / entry["depth"] if entry.get("depth") else None
        color, depth = read_png_pair(cf, df)
        images.append(Image(entry["name"], color, depth, cf, df, entry))
    return expected, images


def scene_images(count: int, seed: int, width: int, height: int, depth: bool) -> list[Image]:
    from dd.synth.scenes import generate_scene

    out = []
    for k in range(count):
        s = generate_scene(seed + k, width, height)
        out.append(Image(f"scene{seed + k}_{width}x{height}", s.color, s.depth if depth else None))
    return out


def run_engine(engine: Any, images: Iterable[Image], score_threshold: float) -> list[Dets]:
    """One image a time (answers must not depend on batching; the server tests batching)."""
    from dd.worker.engines.base import EngineInput

    out = []
    for im in images:
        (det,) = engine.infer([EngineInput(im.color, im.depth, score_threshold)])
        out.append(from_engine(det, im.color.shape[0], im.color.shape[1]))
    return out


def parse_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """ENGINE[:DEVICE[:OPTIONS]] -> (engine, device, options). OPTIONS is a JSON object of ENGINE_OPTIONS
    merged over the folder's, e.g. 'fast:cuda:{"fp16": false}'; "default" is the folder's own engine and
    the device is cpu unless given."""
    name, _, rest = spec.partition(":")
    device, _, options = rest.partition(":")
    opts: dict[str, Any] = {}
    if options:
        try:
            opts = json.loads(options)
        except json.JSONDecodeError as exc:
            raise ValueError(f"engine spec {spec!r}: OPTIONS must be a JSON object ({exc})") from None
        if not isinstance(opts, dict):
            raise ValueError(f"engine spec {spec!r}: OPTIONS must be a JSON object, e.g. {{\"fp16\": false}}")
    return name or "default", device or "cpu", opts


def load(folder: Path, spec: str) -> tuple[Any, Any]:
    """ENGINE[:DEVICE[:OPTIONS]] (see parse_spec) -> (config, loaded engine)."""
    from dd.config import load_model_config
    from dd.worker.engines import load_engine

    name, device, opts = parse_spec(spec)
    cfg = load_model_config(folder)
    if name != "default":
        cfg = dataclasses.replace(cfg, engine=name)
    if opts:
        cfg = dataclasses.replace(cfg, engine_options={**cfg.engine_options, **opts})
    return cfg, load_engine(cfg, device)


def _answers(folder: Path, spec: str, images: list[Image], score_threshold: float) -> tuple[list[Dets], dict[str, Any]]:
    """One engine's answers on the images (loaded, run one image a time, closed), with its timings."""
    import time

    t0 = time.perf_counter()
    _, engine = load(folder, spec)
    loaded = time.perf_counter()
    try:
        out = run_engine(engine, images, score_threshold)
    finally:
        engine.close()
    done = time.perf_counter()
    info = {"engine": getattr(engine, "name", type(engine).__name__), "load_s": loaded - t0,
            "run_s": done - loaded, "s_per_image": (done - loaded) / max(1, len(images))}
    return out, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Parity of detectors on the same images (issue #13's bounds). A reference is detectron2's "
                    "stored answers (expected.json of a model folder) or an engine; every candidate is compared "
                    "with every reference, and each engine runs once.",
        epilog="engines: ENGINE[:DEVICE[:OPTIONS]], ENGINE one of default (the folder's own), detectron2, "
               "torchvision, fast; OPTIONS a JSON object of ENGINE_OPTIONS\n"
               "examples:\n"
               "  python -m tests.parity                      # every detectron2 fixture, CPU engine vs detectron2\n"
               "  python -m tests.parity tests/fixtures/detectron2/rgbd --candidate fast:cuda\n"
               "  python -m tests.parity MODEL --reference default:cpu --candidate fast:cuda --scenes 50\n"
               "  python -m tests.parity MODEL --reference default:cpu --reference expected \\\n"
               "      --candidate fast:cuda --candidate 'fast:cuda:{\"fp16\": false}' --json parity.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", type=Path, help="model folders (default: every folder of the detectron2 "
                   "fixtures)")
    p.add_argument("--reference", action="append", default=None,
                   help='"expected" (the folder\'s expected.json: detectron2) or ENGINE[:DEVICE[:OPTIONS]]; '
                        'repeat for several (default: expected)')
    p.add_argument("--candidate", action="append", default=None,
                   help="ENGINE[:DEVICE[:OPTIONS]]; repeat for several (default: the folder's engine on cpu)")
    p.add_argument("--scenes", type=int, default=0,
                   help="test on this many generated scenes instead of the folder's stored images")
    p.add_argument("--seed", type=int, default=10_000_000, help="first scene seed (with --scenes)")
    p.add_argument("--size", default="640x480", help="scene WIDTHxHEIGHT (with --scenes)")
    p.add_argument("--strict-iou", type=float, default=0.98,
                   help="also report the pairs matched at this box IoU (issue #18's fast-vs-eager check)")
    p.add_argument("--json", type=Path, help="also write the metrics here: a list of {folder, reference, "
                   "candidate, ...} records, rewritten after each comparison")
    args = p.parse_args(argv)
    references = args.reference or ["expected"]
    candidates = args.candidate or ["default:cpu"]
    for spec in (*references, *candidates):
        if spec != "expected":
            try:
                parse_spec(spec)
            except ValueError as exc:
                p.error(str(exc))
    if args.scenes and "expected" in references:
        p.error("--reference expected needs the folder's stored images (drop --scenes)")
    folders = args.folders or sorted(f for f in DETECTRON2_FIXTURES.iterdir() if (f / "node_config.json").is_file())
    records: list[dict[str, Any]] = []
    ok = True
    for folder in folders:
        from dd.config import load_model_config

        cfg = load_model_config(folder)
        if args.scenes:
            w, h = (int(v) for v in args.size.lower().split("x"))
            images = scene_images(args.scenes, args.seed, w, h, cfg.input_kind == "rgbd")
        else:
            _, images = expected_images(folder)
        names = [im.name for im in images]
        answers: dict[str, list[Dets]] = {}
        timings: dict[str, dict[str, Any]] = {}
        for spec in references:
            if spec == "expected":
                answers[spec] = [from_expected(im.expected) for im in images]  # type: ignore[arg-type]
            else:
                answers[spec], timings[spec] = _answers(folder, spec, images, cfg.score_threshold)
                print(f"{folder}: {spec}: {timings[spec]['engine']} engine, load {timings[spec]['load_s']:.1f} s, "
                      f"{timings[spec]['s_per_image']:.3f} s/image", flush=True)
        for cand_spec in candidates:
            if cand_spec not in answers:
                answers[cand_spec], timings[cand_spec] = _answers(folder, cand_spec, images, cfg.score_threshold)
                t = timings[cand_spec]
                print(f"{folder}: {cand_spec}: {t['engine']} engine, load {t['load_s']:.1f} s, "
                      f"{t['s_per_image']:.3f} s/image", flush=True)
            for ref_spec in references:
                if ref_spec == cand_spec:
                    continue
                metrics = compare(answers[ref_spec], answers[cand_spec], cfg.score_threshold, names=names)
                strict = compare(answers[ref_spec], answers[cand_spec], cfg.score_threshold,
                                 Bounds(match_iou=args.strict_iou), names=names)
                bad = failures(metrics)
                ok = ok and not bad
                print(f"{folder}: {cand_spec} vs {ref_spec}: {'OK' if not bad else 'FAIL'}")
                print(f"  {summary(metrics)}")
                low = strict["mask_iou_min"]
                print(f"  at box IoU >= {args.strict_iou}: matched {strict['matched']}/"
                      f"{strict['reference_detections']} ({strict['matched_fraction']:.4f}), mask IoU min "
                      f"{'n/a' if low is None else format(low, '.4f')}")
                for line in bad:
                    print(f"  - {line}")
                records.append({"folder": str(folder), "reference": ref_spec, "candidate": cand_spec,
                                "passes": not bad, "failures": bad,
                                "timings": {k: timings.get(k) for k in (ref_spec, cand_spec)},
                                "strict": {"match_iou": args.strict_iou, "matched": strict["matched"],
                                           "matched_fraction": strict["matched_fraction"],
                                           "mask_iou_mean": strict["mask_iou_mean"],
                                           "mask_iou_min": strict["mask_iou_min"]},
                                "metrics": metrics})
                if args.json:
                    args.json.write_text(json.dumps(records, indent=1) + "\n")
                sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
