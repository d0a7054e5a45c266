#!/usr/bin/env python
"""Development check: this server's detectron2 engine against real detectron2 on the same folder.

Builds a Mask R-CNN with detectron2 itself (random weights, scaled so that class scores,
proposals and masks are decided, not tied), saves it with detectron2's DetectionCheckpointer
beside its dumped YAML as a model folder, runs detectron2's DefaultPredictor and this
server's engine (dd.worker.engines.load_engine, CPU) on dd.synth scenes, and prints the
parity numbers of issue 13: detections matched (same class, box IoU >= 0.9), box corner
deviation (p99, max), score deviation (max), mask IoU of matched pairs (mean, min).

Needs detectron2's source on the path (nothing is compiled):

    PYTHONPATH=/work/d2src python scripts/compare_detectron2.py --arch tiny --kind rgbd --scenes 4

Writes the model folder to --out (kept, so it can be served: deep-detection serve OUT).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ARCHES = {
    # A narrow ResNet-50-FPN: every code path of the real one, fast on a CPU.
    "tiny": ["MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.WIDTH_PER_GROUP", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
             "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
             "MODEL.ROI_MASK_HEAD.CONV_DIM", 32],
    "r18": ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.FPN.OUT_CHANNELS", 64,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 128, "MODEL.ROI_MASK_HEAD.CONV_DIM", 64],
    "r50": ["MODEL.RESNETS.DEPTH", 50],
}
FPN_MASK_RCNN = [
    "MODEL.DEVICE", "cpu", "MODEL.MASK_ON", True, "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
    "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]],
    "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"], "MODEL.RPN.PRE_NMS_TOPK_TEST", 1000,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 1000, "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"], "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_FC", 2, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, "MODEL.ROI_MASK_HEAD.NUM_CONV", 4,
]


def d2_config(arch: str, kind: str, classes: int, min_size: int, score: float, extra: list) -> "CfgNode":  # noqa: F821
    from detectron2.config import get_cfg

    cfg = get_cfg()
    opts = FPN_MASK_RCNN + ARCHES[arch] + ["MODEL.ROI_HEADS.NUM_CLASSES", classes, "INPUT.MIN_SIZE_TEST", min_size,
                                           "INPUT.MAX_SIZE_TEST", 1333, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", score]
    if kind == "rgbd":
        opts += ["MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675, 1.8], "MODEL.PIXEL_STD", [57.375, 57.12, 58.395, 0.6]]
    cfg.merge_from_list(opts + extra)
    return cfg


@torch.no_grad()
def calibrate(model: torch.nn.Module, image: torch.Tensor) -> None:
    """Sets every frozen batch norm's statistics to those of its input on one image (one forward, in
    order), as a trained network's are: activations stay near unit scale through any depth."""
    from detectron2.layers import FrozenBatchNorm2d

    def hook(norm: torch.nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    try:
        model.backbone(model.preprocess_image([{"image": image}]).tensor)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def decide(model: torch.nn.Module, seed: int, image: torch.Tensor) -> None:
    """Random weights with decided answers: batch norms calibrated, and the predictors' near-zero
    initialisation replaced by weights that spread class scores, proposals and mask logits."""
    calibrate(model, image)
    g = torch.Generator().manual_seed(seed)

    def spread(layer: torch.nn.Module, gain: float) -> None:
        fan_in = layer.weight[0].numel()
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * gain / fan_in ** 0.5)

    heads = model.roi_heads
    spread(heads.box_predictor.cls_score, 2.0)
    heads.box_predictor.cls_score.bias.zero_()
    heads.box_predictor.cls_score.bias[-1] = -1.0  # fewer backgrounds, so that detections are many
    spread(heads.box_predictor.bbox_pred, 0.5)
    rpn = model.proposal_generator.rpn_head
    spread(rpn.objectness_logits, 3.0)
    spread(rpn.anchor_deltas, 0.3)
    spread(heads.mask_head.predictor, 4.0)


def make_folder(out: Path, cfg, kind: str, classes: int, seed: int, container: str, sample: np.ndarray) -> Path:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    image = torch.as_tensor(np.ascontiguousarray(sample.transpose(2, 0, 1)).astype(np.float32))
    decide(model, seed, image)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"iteration": 2499} if container == "trainer" else {}
    DetectionCheckpointer(model, save_dir=str(out)).save("model_final", **extra)
    (out / "config.yaml").write_text(cfg.dump())
    (out / "categories.txt").write_text("".join(f"class{i}\n" for i in range(classes)))
    (out / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBDMaskRCNNTorchServicer" if kind == "rgbd" else "RGBMaskRCNNTorchServicer",
        "MODEL_WEIGHT": "model_final.pth", "CONFIG_FILE": "config.yaml", "CATEGORY_FILE": "categories.txt"},
        indent=2) + "\n")
    return out


def d2_input(color: np.ndarray, depth: np.ndarray | None) -> np.ndarray:
    """What DefaultPredictor is given: BGR uint8, or the B, G, R, D float32 image (depth in metres)."""
    bgr = np.ascontiguousarray(color[:, :, ::-1])
    if depth is None:
        return bgr
    d = depth.astype(np.float32) * np.float32(0.001)
    return np.concatenate([bgr.astype(np.float32), d[..., None]], axis=2)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def compare(ref: dict, ours: dict, thr: float) -> dict:
    """Greedy matching of detectron2's detections (by score) to ours: same class, best box IoU >= 0.9."""
    ious = box_iou(ref["boxes"], ours["boxes"]) if len(ref["boxes"]) and len(ours["boxes"]) else \
        np.zeros((len(ref["boxes"]), len(ours["boxes"])))
    used: set[int] = set()
    corner, score, mask_iou, unmatched_confident, matched = [], [], [], 0, 0
    for i in np.argsort(-ref["scores"], kind="stable"):
        cand = [j for j in np.argsort(-ious[i]) if j not in used and ious[i, j] >= 0.9
                and ours["labels"][j] == ref["labels"][i]]
        if not cand:
            unmatched_confident += int(ref["scores"][i] >= thr + 0.05)
            continue
        j = cand[0]
        used.add(j)
        matched += 1
        corner += list(np.abs(ref["boxes"][i] - ours["boxes"][j]))
        score.append(abs(float(ref["scores"][i]) - float(ours["scores"][j])))
        a, b = ref["masks"][i], ours["masks"][j]
        union = np.logical_or(a, b).sum()
        mask_iou.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
    return {"ref": len(ref["scores"]), "ours": len(ours["scores"]), "matched": matched, "corner": corner,
            "score": score, "mask_iou": mask_iou, "unmatched_confident": unmatched_confident}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHES), default="tiny")
    ap.add_argument("--kind", choices=("rgb", "rgbd"), default="rgb")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-size", type=int, default=416)
    ap.add_argument("--score", type=float, default=0.3)
    ap.add_argument("--size", default="640x480", help="scene width x height")
    ap.add_argument("--container", choices=("model", "trainer"), default="trainer")
    ap.add_argument("--out", type=Path, default=Path("/tmp/d2-compare"))
    ap.add_argument("opts", nargs="*", help="extra detectron2 config KEY VALUE pairs")
    args = ap.parse_args()
    from detectron2.engine import DefaultPredictor

    from dd.config import load_model_config
    from dd.synth.scenes import generate_scene
    from dd.worker.engines import load_engine
    from dd.worker.engines.base import EngineInput

    extra = [eval(v) if v[:1] in "[(" else v for v in args.opts]  # noqa: S307 - the developer's own command line
    cfg = d2_config(args.arch, args.kind, args.classes, args.min_size, args.score, extra)
    w, h = (int(v) for v in args.size.split("x"))
    calib = generate_scene(999, w, h)
    folder = make_folder(args.out / f"{args.arch}-{args.kind}", cfg, args.kind, args.classes, args.seed,
                         args.container, d2_input(calib.color, calib.depth if args.kind == "rgbd" else None))
    cfg.MODEL.WEIGHTS = str(folder / "model_final.pth")
    predictor = DefaultPredictor(cfg)
    engine = load_engine(load_model_config(folder), "cpu")
    totals: dict = {"ref": 0, "ours": 0, "matched": 0, "corner": [], "score": [], "mask_iou": [],
                    "unmatched_confident": 0}
    t_ref = t_ours = 0.0
    for k in range(args.scenes):
        scene = generate_scene(1000 + k, w, h)
        depth = scene.depth if args.kind == "rgbd" else None
        t0 = time.perf_counter()
        inst = predictor(d2_input(scene.color, depth))["instances"]
        t1 = time.perf_counter()
        det = engine.infer([EngineInput(scene.color, depth, engine.config.score_threshold)])[0]
        t2 = time.perf_counter()
        t_ref, t_ours = t_ref + t1 - t0, t_ours + t2 - t1
        ref = {"boxes": inst.pred_boxes.tensor.numpy(), "scores": inst.scores.numpy(),
               "labels": inst.pred_classes.numpy() + 1, "masks": inst.pred_masks.numpy()}
        ours = {"boxes": det.boxes, "scores": det.scores, "labels": det.labels, "masks": det.masks}
        r = compare(ref, ours, engine.config.score_threshold)
        for key in totals:
            totals[key] += r[key]
        print(f"scene {k}: detectron2 {r['ref']} detections, ours {r['ours']}, matched {r['matched']}")
    corner = np.array(totals["corner"] or [0.0])
    print(f"\n{args.arch} {args.kind}: {args.scenes} scenes {w}x{h}, MIN_SIZE_TEST {args.min_size}, "
          f"SCORE_THRESH_TEST {args.score}")
    print(f"  detections: detectron2 {totals['ref']}, ours {totals['ours']}, matched {totals['matched']} "
          f"({100.0 * totals['matched'] / max(1, totals['ref']):.2f}%), confident unmatched "
          f"{totals['unmatched_confident']}")
    print(f"  box corner deviation: p99 {np.percentile(corner, 99):.2e} px, max {corner.max():.2e} px")
    print(f"  score deviation: max {max(totals['score'] or [0.0]):.2e}")
    mious = totals["mask_iou"] or [1.0]
    print(f"  mask IoU of matched pairs: mean {np.mean(mious):.6f}, min {np.min(mious):.6f}")
    print(f"  time per image: detectron2 {1e3 * t_ref / args.scenes:.0f} ms, ours {1e3 * t_ours / args.scenes:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
