#!/usr/bin/env python3
"""Make the detectron2 parity fixtures: small Mask R-CNNs saved by detectron2 itself, and its answers.

Why: the server must answer exactly as detectron2 does for the users' model folders (issue #13). The only
honest reference is detectron2 itself, but CI must not need it; so this script runs real detectron2 once
and commits what it produced (tests/fixtures/detectron2/), and tests/integration/test_detectron2_parity.py checks the
project against those files without detectron2 installed.

Regenerate (from the repository root; detectron2's source on PYTHONPATH, nothing compiled, CPU only):

    PYTHONPATH=/work/d2src python scripts/make_detectron2_fixtures.py --out tests/fixtures/detectron2

detectron2 is imported only inside this script; nothing of it is copied into the project.

What it does, per model (three models, see MODELS):
  1. writes the model's YAML files (a `_BASE_` chain, relative to each file) and builds the model through
     detectron2's own config system (get_cfg + merge_from_file) and build_model;
  2. gives it weights: detectron2's own random initialisation (seeded), then calibrated and fitted on
     generated scenes (CALIBRATION_SEEDS, never the test scenes) so that the answers are peaked, diverse
     and non-trivial, and a correct implementation matches detectron2 almost exactly while a subtly
     wrong one does not:
       - every FrozenBN gets the running mean/variance of its input over the calibration images (a BN
         calibration: activations stay well scaled through 50/101 layers) and random affine weight/bias,
         so FrozenBN folding (eps, order) matters;
       - the RPN's objectness logits are scaled to a spread of OBJECTNESS_STD (proposals ranked, not
         tied) and its deltas to RPN_DELTA_STD (proposals leave the anchor grid);
       - the box predictor is a linear probe on the box head's (random) features, fitted in closed form
         / L-BFGS: proposals with IoU >= 0.5 to a carton get its class (0/1/2 by the carton's luminance,
         LUMINANCE_SPLITS), the others background; box deltas are ridge-regressed onto the cartons (with
         a little per-class noise, so that reading another class's deltas shows). The logits are then
         sharpened (CLS_SHARPEN), the foreground biases balanced so all three classes are detected about
         equally often, and the background bias bisected to ~TARGET_DETECTIONS per calibration image;
       - the mask predictor is a per-pixel linear probe on the mask head's features against the cartons'
         masks, sharpened (MASK_SHARPEN), its bias set so that MASK_POSITIVE of the cells are foreground
         (carton tops fill their boxes; a mask that fills its box would not test the mask path).
     Detections therefore lie on and around the cartons, with ragged but non-trivial masks; they are not
     accurate and need not be. Real end-to-end training was not used: from scratch with FrozenBN (no
     normalisation) it does not converge in the ~10 CPU minutes allowed (a step takes ~2 s here).
  3. runs TRAIN_STEPS real SGD steps through detectron2's SimpleTrainer + LRScheduler hook at a tiny
     learning rate (the weights barely move) so that the checkpoint carries real optimizer and scheduler
     state (momentum buffers), and saves it through DetectionCheckpointer as a *trainer* checkpoint:
     "rgbd" in today's DefaultTrainer layout (model, trainer{iteration, optimizer, hooks}, iteration),
     "rgb" in the older layout (model, optimizer, scheduler, iteration), "rgb-pkl" as a model-zoo .pkl
     ({"model": {name: numpy}, "__author__", "matching_heuristics": True}). Each folder also gets the
     merged config (cfg.dump(): config_dump.yaml), node_config.json with the seed's keys only, and
     categories.txt. Where node_config's MIN_SIZE / SCORE_THRESH_TEST differ from the YAML's
     ("rgbd", "rgb-pkl"), detectron2 runs with node_config's values, as the server must.
  4. runs DefaultPredictor (fp32, CPU) on the stored test images (IMAGES: generated scenes, seeds and sizes
     listed there; shared by all models under images/) and writes expected.json: per image the boxes
     (x1, y1, x2, y2), scores, detectron2's 0-based classes, the server's 1-based class_id, and masks as
     COCO compressed RLE. Input as a user's code gives it: RGB models get a BGR uint8 image (as
     cv2.imread returns); RGB-D models get float32 H x W x 4, channels B, G, R (0-255) and D = the 16-bit
     PNG's millimetres / 1000 (metres; missing pixels 0 stay 0).

Deterministic: seeds everywhere, one torch thread. A run takes ~3 CPU minutes (8 wall minutes on a busy
2-core machine); --only NAME remakes one model (the shared images are always rewritten).
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from dd.synth.scenes import generate_scene  # noqa: E402

CATEGORIES = ["carton", "bag", "tray"]

#: Test images: (seed, width, height). 640x480 as the users' cameras; a 16:9 one whose resize is capped
#: by MAX_SIZE_TEST (shrink); a portrait one; an odd-sized one whose scale is not a round number. Seeds
#: chosen (the first from 1301 up with two classes or more) so that the four hold all three classes.
IMAGES: list[tuple[int, int, int]] = [(1301, 640, 480), (1307, 576, 324), (1305, 360, 480), (1306, 401, 299)]
#: Calibration scenes (weights only; never stored, never tested on).
CALIBRATION_SEEDS: list[tuple[int, int, int]] = [(900 + i, *((640, 480), (576, 324), (480, 360), (480, 640))[i % 4])
                                                  for i in range(24)]
#: Training scenes for the TRAIN_STEPS steps that give the checkpoint real optimizer state.
TRAIN_SEEDS = (801, 802, 803, 804, 805, 806)
TRAIN_STEPS = 3

OBJECTNESS_STD = 2.5  # spread of the RPN's objectness logits: proposals ranked, not tied
RPN_DELTA_STD = 0.15  # spread of the RPN's deltas: proposals leave the anchor grid
CLS_SHARPEN = 3.0  # the fitted class logits, multiplied: peaked scores
MASK_SHARPEN = 3.0  # the fitted mask logits, multiplied: crisp mask borders
MASK_POSITIVE = 0.7
#: Carton classes from the mean luminance of its top face (0 dark, 1 kraft, 2 white): a rule the
#: features can see, so that all three classes occur and are told apart.
LUMINANCE_SPLITS = (123.0, 155.0)
TARGET_DETECTIONS = 10.0  # per calibration image, about the cartons in view

# ----------------------------------------------------------------------------- the models' YAML files

#: The architecture every model shares, written as a user would (detectron2's Base-RCNN-FPN.yaml, narrowed).
#: ResNet-50/101 bottleneck blocks, not ResNet-18: detectron2 insists on RES2_OUT_CHANNELS 64 for R18/R34
#: (build_resnet_backbone asserts it), which makes an R18 ~45 MB; a narrow R50 is ~0.4 MB.
BASE_SMALL = """\
# Shared base of the parity fixtures: detectron2's Base-RCNN-FPN, narrowed so that weights stay small.
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  MASK_ON: True
  BACKBONE:
    NAME: "build_resnet_fpn_backbone"
  RESNETS:
    DEPTH: 50
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
    STEM_OUT_CHANNELS: 16
    RES2_OUT_CHANNELS: 16
    WIDTH_PER_GROUP: 4
  FPN:
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    OUT_CHANNELS: 32
  ANCHOR_GENERATOR:
    SIZES: [[32], [64], [128], [256], [512]]
    ASPECT_RATIOS: [[0.5, 1.0, 2.0]]
  RPN:
    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
    PRE_NMS_TOPK_TEST: 1000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "StandardROIHeads"
    IN_FEATURES: ["p2", "p3", "p4", "p5"]
    NUM_CLASSES: 3
    SCORE_THRESH_TEST: 0.5
  ROI_BOX_HEAD:
    NAME: "FastRCNNConvFCHead"
    NUM_FC: 2
    FC_DIM: 128
    POOLER_RESOLUTION: 7
  ROI_MASK_HEAD:
    NAME: "MaskRCNNConvUpsampleHead"
    NUM_CONV: 4
    CONV_DIM: 32
    POOLER_RESOLUTION: 14
INPUT:
  MIN_SIZE_TEST: 320
  MAX_SIZE_TEST: 512
SOLVER:
  IMS_PER_BATCH: 2
  BASE_LR: 0.00001
  MAX_ITER: 3
  STEPS: []
  WARMUP_ITERS: 1
VERSION: 2
"""

#: RGB-D, as the users' depalletising models: 4-channel B, G, R, D (metres) input. Its base sits in a
#: subfolder and has a base of its own, so `_BASE_` must resolve relative to each file, recursively.
BASE_RGBD = """\
_BASE_: "Base-small.yaml"
# Colour in 0-255 (B, G, R), depth in metres: the 4th mean/std normalise the depth channel.
MODEL:
  PIXEL_MEAN: [103.53, 116.28, 123.675, 2.4]
  PIXEL_STD: [57.375, 57.12, 58.395, 0.5]
INPUT:
  FORMAT: "BGR"
"""

RGBD_MAIN = """\
_BASE_: "bases/Base-RGBD.yaml"
MODEL:
  RESNETS:
    DEPTH: 50
    STRIDE_IN_1X1: True
  RPN:
    NMS_THRESH: 0.65
"""

#: RGB in detectron2's RGB input format (torchvision-style statistics), ResNeXt-style groups on a
#: ResNet-101, stride in the 3x3, smaller offset anchors, class-agnostic box regression and masks,
#: a box head with a conv, fewer proposals and detections than the defaults.
RGB_MAIN = """\
_BASE_: "Base-small.yaml"
MODEL:
  BACKBONE:
    FREEZE_AT: 5  # training only (the whole ResNet frozen): keeps momentum buffers, and the file, small
  PIXEL_MEAN: [123.675, 116.28, 103.53]
  PIXEL_STD: [58.395, 57.12, 57.375]
  RESNETS:
    DEPTH: 101
    NUM_GROUPS: 2
    WIDTH_PER_GROUP: 2
    STRIDE_IN_1X1: False
  ANCHOR_GENERATOR:
    SIZES: [[16], [32], [64], [128], [256]]
    OFFSET: 0.5
  RPN:
    PRE_NMS_TOPK_TEST: 500
    POST_NMS_TOPK_TEST: 300
    NMS_THRESH: 0.6
  ROI_HEADS:
    NMS_THRESH_TEST: 0.6
  ROI_BOX_HEAD:
    NUM_CONV: 1
    CONV_DIM: 32
    NUM_FC: 1
    FC_DIM: 64
    CLS_AGNOSTIC_BBOX_REG: True
  ROI_MASK_HEAD:
    NUM_CONV: 2
    CLS_AGNOSTIC_MASK: True
INPUT:
  FORMAT: "RGB"
TEST:
  DETECTIONS_PER_IMAGE: 50
"""

#: The model-zoo .pkl model: detectron2's default (caffe2-style) normalisation, i.e. PIXEL_MEAN/STD left
#: out of the YAML (std 1.0), BGR, a narrower FPN and mask head.
PKL_MAIN = """\
_BASE_: "Base-small.yaml"
MODEL:
  FPN:
    OUT_CHANNELS: 16
  ROI_BOX_HEAD:
    FC_DIM: 64
  ROI_MASK_HEAD:
    CONV_DIM: 16
"""


@dataclass
class ModelSpec:
    name: str
    detection_type: str
    yaml_files: dict[str, str]  # relative path -> text
    config_file: str  # the one node_config names (the head of the _BASE_ chain)
    weight_file: str
    layout: str  # "trainer" (DefaultTrainer today), "optimizer" (older trainers), "pkl" (model zoo)
    node_min_size: int
    node_score: float
    depth: bool
    seed: int
    notes: list[str] = field(default_factory=list)


MODELS = [
    ModelSpec("rgbd", "RGBDMaskRCNNTorchServicer",
              {"bases/Base-small.yaml": BASE_SMALL, "bases/Base-RGBD.yaml": BASE_RGBD, "depallet_r50.yaml": RGBD_MAIN},
              "depallet_r50.yaml", "model_best@{iteration}.pth", "trainer", node_min_size=352, node_score=0.6,
              depth=True, seed=13_001,
              notes=["node_config overrides MIN_SIZE (YAML 320) and SCORE_THRESH_TEST (YAML 0.5)"]),
    ModelSpec("rgb", "RGBMaskRCNNTorchServicer",
              {"Base-small.yaml": BASE_SMALL, "rgb_x101.yaml": RGB_MAIN},
              "rgb_x101.yaml", "model_final.pth", "optimizer", node_min_size=320, node_score=0.5,
              depth=False, seed=13_002, notes=["node_config repeats the YAML's MIN_SIZE and SCORE_THRESH_TEST"]),
    ModelSpec("rgb-pkl", "RGBMaskRCNNTorchServicer",
              {"Base-small.yaml": BASE_SMALL, "zoo_r50.yaml": PKL_MAIN},
              "zoo_r50.yaml", "model_final.pkl", "pkl", node_min_size=288, node_score=0.55,
              depth=False, seed=13_003,
              notes=["node_config overrides MIN_SIZE (YAML 320) and SCORE_THRESH_TEST (YAML 0.5)"]),
]


# ----------------------------------------------------------------------------- inputs


def read_image_files(color_path: Path, depth_path: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored files as a user's code reads them: BGR uint8 (cv2.imread) and uint16 millimetres."""
    color_bgr = cv2.imread(str(color_path), cv2.IMREAD_COLOR)
    depth = cv2.imread(str(depth_path), cv2.IMREAD_UNCHANGED) if depth_path is not None else None
    if color_bgr is None or (depth_path is not None and (depth is None or depth.dtype != np.uint16)):
        raise RuntimeError(f"cannot read {color_path} / {depth_path}")
    return color_bgr, depth


def predictor_input(color_bgr: np.ndarray, depth_mm: np.ndarray | None) -> np.ndarray:
    """What DefaultPredictor is given: the BGR uint8 image, or float32 B, G, R (0-255), D (metres)."""
    if depth_mm is None:
        return color_bgr
    d = depth_mm.astype(np.float32) / np.float32(1000.0)  # 0 (missing) stays 0
    return np.concatenate([color_bgr.astype(np.float32), d[..., None]], axis=2)


def carton_classes(scene: Any) -> np.ndarray:
    """0-based class of each carton: its top face's mean luminance against LUMINANCE_SPLITS."""
    lum = scene.color.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.array([int(np.searchsorted(LUMINANCE_SPLITS, lum[m].mean())) for m in scene.masks], np.int64)


@dataclass
class Sample:
    """One calibration scene as DefaultPredictor feeds it to the model, with its ground truth."""

    input: dict[str, Any]  # {"image": C x h x w float tensor (resized, model's channel order), "height", "width"}
    boxes: torch.Tensor  # G x 4, original pixels
    masks: torch.Tensor  # G x H x W bool, original pixels
    classes: torch.Tensor  # G, 0-based
    sx: float  # resized / original
    sy: float


def make_sample(seed: int, width: int, height: int, depth: bool, fmt: str, aug: Any) -> Sample:
    scene = generate_scene(seed, width, height)
    img = predictor_input(np.ascontiguousarray(scene.color[..., ::-1]), scene.depth if depth else None)
    if fmt == "RGB":
        img = img[:, :, ::-1]  # as DefaultPredictor does for INPUT.FORMAT RGB
    tf = aug.get_transform(img)
    resized = tf.apply_image(img)
    inp = {"image": torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1))),
           "height": height, "width": width}
    return Sample(inp, torch.from_numpy(scene.boxes.astype(np.float32)), torch.from_numpy(scene.masks),
                  torch.from_numpy(carton_classes(scene)), tf.new_w / width, tf.new_h / height)


# ----------------------------------------------------------------------------- calibration


class Capture:
    """Forward hooks that keep a module's inputs/outputs of the next forward passes."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, _m: torch.nn.Module, args: tuple, out: Any) -> None:
        self.inputs.append(args)
        self.outputs.append(out)

    def close(self) -> None:
        self._h.remove()


def calibrate(model: torch.nn.Module, samples: list["Sample"], run: Callable[[], list[Any]],
              gen: torch.Generator) -> dict[str, float]:
    """Turn detectron2's random initialisation into a model with peaked, diverse, meaningful answers.

    samples: the calibration scenes as detectron2 model inputs with their ground truth; run() runs the
    model (eval mode) on them, one at a time as DefaultPredictor does, and returns detectron2's outputs.
    """
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.structures import BitMasks, Boxes, pairwise_iou

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    # 1. FrozenBN: statistics measured on the images (a BN calibration), random affine parameters. The
    # last norm of each residual branch gets a small gamma so that the residual sum grows slowly.
    handles = []
    for name, m in model.backbone.named_modules():
        if not isinstance(m, FrozenBatchNorm2d):
            continue
        last_in_branch = name.endswith("conv3.norm")
        shortcut = name.endswith("shortcut.norm")

        def pre_hook(mod: torch.nn.Module, args: tuple, last: bool = last_in_branch, sc: bool = shortcut) -> None:
            x = args[0]
            c = x.shape[1]
            mod.running_mean.copy_(x.mean(dim=(0, 2, 3)) + 0.05 * randn(c))
            mod.running_var.copy_(x.var(dim=(0, 2, 3)).clamp_min(1e-3) * (0.8 + 0.4 * rand(c)))
            scale = 0.3 if last else (0.7 if sc else 1.0)
            mod.weight.copy_(scale * (0.6 + 0.8 * rand(c)))
            mod.bias.copy_(0.2 * randn(c) + (0.0 if last or sc else 0.1))

        handles.append(m.register_forward_pre_hook(pre_hook))
    # one batch of all calibration images: each FrozenBN's statistics are over all of them
    model.backbone(model.preprocess_image([smp.input for smp in samples]).tensor)
    for h in handles:
        h.remove()

    # 2. RPN: ranked objectness, moving proposals.
    rpn_head = model.proposal_generator.rpn_head
    cap = Capture(rpn_head)
    run()
    cap.close()
    logits = torch.cat([t.flatten() for out in cap.outputs for t in out[0]])
    deltas = torch.cat([t.flatten() for out in cap.outputs for t in out[1]])
    k = OBJECTNESS_STD / float(logits.std())
    rpn_head.objectness_logits.weight.mul_(k)
    rpn_head.objectness_logits.bias.copy_((rpn_head.objectness_logits.bias - float(logits.mean())) * k)
    k = RPN_DELTA_STD / float(deltas.std())
    rpn_head.anchor_deltas.weight.mul_(k)
    rpn_head.anchor_deltas.bias.zero_()

    # 3. Box predictor, fitted (a linear probe on the box head's random features): proposals that overlap a
    # carton (IoU >= 0.5) get its class, the others background; deltas regress the proposals onto it.
    rh = model.roi_heads
    predictor = rh.box_predictor
    n_cls = predictor.cls_score.out_features - 1  # background is the last class in detectron2
    feats_all, labels_all, deltas_all, fg_cls_all = [], [], [], []
    mask_feats, mask_targets, mask_cls = [], [], []
    for smp in samples:
        images = model.preprocess_image([smp.input])
        feats = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, feats, None)
        props = proposals[0].proposal_boxes
        box_x = rh.box_head(rh.box_pooler([feats[f] for f in rh.box_in_features], [props]))
        gt = Boxes(smp.boxes * torch.tensor([smp.sx, smp.sy, smp.sx, smp.sy]))
        iou, idx = pairwise_iou(gt, props).max(dim=0)
        fg = iou >= 0.5
        labels = torch.where(fg, smp.classes[idx], torch.full_like(idx, n_cls))
        feats_all.append(box_x)
        labels_all.append(labels)
        deltas_all.append(predictor.box2box_transform.get_deltas(props.tensor[fg], gt.tensor[idx[fg]]))
        fg_cls_all.append(smp.classes[idx[fg]])
        # Mask head features of the foreground proposals, targets cut from the full-size GT masks.
        sel = torch.nonzero(fg).flatten()[:200]
        if len(sel):
            mx = rh.mask_pooler([feats[f] for f in rh.mask_in_features], [props[sel]])
            for layer in list(rh.mask_head.children())[:-1]:
                mx = layer(mx)
            orig = props.tensor[sel] / torch.tensor([smp.sx, smp.sy, smp.sx, smp.sy])
            side = mx.shape[-1]
            tgt = BitMasks(smp.masks[idx[sel]]).crop_and_resize(orig, side)
            mask_feats.append(mx)
            mask_targets.append(tgt)
            mask_cls.append(smp.classes[idx[sel]])
    x = torch.cat(feats_all)
    y = torch.cat(labels_all)
    counts = torch.bincount(y, minlength=n_cls + 1).float()
    w, b = fit_linear(x, y, n_cls + 1, class_weight=counts.sum() / (counts.clamp_min(1) * (n_cls + 1)))
    predictor.cls_score.weight.copy_(w * CLS_SHARPEN)
    predictor.cls_score.bias.copy_(b * CLS_SHARPEN)
    fgx = x[y < n_cls]
    d = torch.cat(deltas_all)
    fg_cls = torch.cat(fg_cls_all)
    box = predictor.bbox_pred
    rows = box.out_features // 4  # 1 when CLS_AGNOSTIC_BBOX_REG
    for c in range(rows):
        sel = fg_cls == c
        if rows == 1 or int(sel.sum()) < 50:  # class-agnostic, or too few samples: fit on all cartons
            sel = torch.ones_like(fg_cls, dtype=torch.bool)
        bw, bb = ridge(fgx[sel], d[sel])
        # a little per-class noise: taking another class's row of deltas must show
        box.weight[4 * c:4 * c + 4] = bw + (0.1 * randn(*bw.shape) * bw.std() if rows > 1 else 0)
        box.bias[4 * c:4 * c + 4] = bb

    def mean_count(bg: float) -> float:
        predictor.cls_score.bias[n_cls] = bg
        return float(np.mean([len(o["instances"]) for o in run()]))

    def set_count() -> float:
        """Bisects the background bias (detections fall as it rises) to TARGET_DETECTIONS per image."""
        centre = float(predictor.cls_score.bias[n_cls])
        lo, hi = centre - 20.0, centre + 20.0
        for _ in range(12):
            mid = (lo + hi) / 2
            if mean_count(mid) > TARGET_DETECTIONS:
                lo = mid
            else:
                hi = mid
        predictor.cls_score.bias[n_cls] = (lo + hi) / 2
        return (lo + hi) / 2

    fitted_bg = float(predictor.cls_score.bias[n_cls])
    predictor.cls_score.bias[:n_cls] = float(predictor.cls_score.bias[:n_cls].mean())  # balanced below
    set_count()
    # The weak probe favours some classes; nudge the foreground biases until each class is detected
    # about equally often on the calibration scenes, then fix the count again.
    for _ in range(6):
        found = torch.cat([o["instances"].pred_classes for o in run()])
        per_class = torch.bincount(found, minlength=n_cls).float()
        predictor.cls_score.bias[:n_cls] += torch.log((per_class.mean() + 1) / (per_class + 1))
    bg = set_count()
    count = mean_count(bg)
    outs = run()
    print("  calibration detections per image", [len(o["instances"]) for o in outs], "classes",
          torch.bincount(torch.cat([o["instances"].pred_classes for o in outs]), minlength=n_cls).tolist(),
          f"(background bias {fitted_bg:.2f} fitted -> {bg:.2f})")

    # 4. Mask predictor, fitted per pixel on the mask head's random features, then sharpened.
    mask_pred = rh.mask_head.predictor
    mx = torch.cat(mask_feats).permute(0, 2, 3, 1).reshape(-1, mask_pred.in_channels)
    my = torch.cat(mask_targets).reshape(-1).long()
    pos = float(my.float().mean())
    mw, mb = fit_linear(mx, my, 2, class_weight=torch.tensor([0.5 / (1 - pos), 0.5 / pos]))
    w1 = (mw[1] - mw[0]) * MASK_SHARPEN
    # Cartons' tops fill their boxes; a mask that fills its box would not test the mask path. The bias
    # leaves MASK_POSITIVE of the foreground proposals' 28x28 cells foreground (the best-scoring ones).
    b1 = -float(torch.quantile((mx @ w1)[:2_000_000], 1.0 - MASK_POSITIVE))
    for c in range(mask_pred.out_channels):
        noise = 0.1 * randn(*w1.shape) * w1.std() if mask_pred.out_channels > 1 else 0
        mask_pred.weight[c, :, 0, 0] = w1 + noise
        mask_pred.bias[c] = b1
    mask_acc = float(((mx @ w1 + b1 > 0).long() == my).float().mean())
    return {"background_bias": bg, "calibration_detections_per_image": count,
            "box_probe_train_accuracy": float((fit_predict(x, w, b) == y).float().mean()),
            "mask_probe_pixel_accuracy": mask_acc}


def fit_linear(x: torch.Tensor, y: torch.Tensor, n: int, class_weight: torch.Tensor | None = None,
               l2: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (L-BFGS, L2), as a quick, deterministic linear probe."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.zeros(n, x.shape[1], requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w.t() + b, y, weight=class_weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / sd).detach()  # undo the standardisation: logits = x @ w_raw.T + b_raw
    return w_raw, (b - (w / sd) @ mu).detach()


def fit_predict(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x @ w.t() + b).argmax(dim=1)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with a small ridge: weight (k x D) and bias (k) for y ~ x @ w.T + b."""
    xa = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    reg = lam * torch.eye(xa.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0
    sol = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y.double())
    return sol[:-1].T.float(), sol[-1].float()


# ----------------------------------------------------------------------------- checkpoints


def train_steps(model: torch.nn.Module, cfg: Any, depth: bool) -> Any:
    """A few real SGD steps through detectron2's SimpleTrainer, so the checkpoint has optimizer state."""
    from detectron2.data import transforms as T
    from detectron2.engine import SimpleTrainer, hooks
    from detectron2.solver import build_lr_scheduler, build_optimizer
    from detectron2.structures import BitMasks, Boxes, Instances

    data: list[dict[str, Any]] = []
    for seed in TRAIN_SEEDS:
        smp = make_sample(seed, 427, 320, depth, cfg.INPUT.FORMAT, T.ResizeShortestEdge([320, 320], 1000))
        inst = Instances((320, 427))
        inst.gt_boxes = Boxes(smp.boxes)
        inst.gt_classes = smp.classes
        inst.gt_masks = BitMasks(smp.masks)
        data.append({"image": smp.input["image"], "instances": inst})

    def loader() -> Any:
        while True:
            for j in range(0, len(data), cfg.SOLVER.IMS_PER_BATCH):
                yield data[j:j + cfg.SOLVER.IMS_PER_BATCH]

    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    trainer = SimpleTrainer(model, loader(), optimizer)
    trainer.register_hooks([hooks.LRScheduler(optimizer, scheduler)])
    trainer.train(0, TRAIN_STEPS)
    model.eval()
    return trainer, optimizer, scheduler


def save_weights(spec: ModelSpec, folder: Path, model: torch.nn.Module, trainer: Any, optimizer: Any,
                 scheduler: Any) -> str:
    """Through detectron2's own checkpointer, in the layout of spec.layout; returns the file name."""
    from detectron2.checkpoint import DetectionCheckpointer

    iteration = trainer.iter - 1  # the last step run, as PeriodicCheckpointer names it
    name = spec.weight_file.format(iteration=iteration)
    if spec.layout == "pkl":
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        with open(folder / name, "wb") as f:
            pickle.dump({"model": state, "__author__": "deep-detection parity fixtures",
                         "matching_heuristics": True}, f)
        return name
    if spec.layout == "trainer":
        ckpt = DetectionCheckpointer(model, str(folder), trainer=trainer)
    else:
        ckpt = DetectionCheckpointer(model, str(folder), optimizer=optimizer, scheduler=scheduler)
    ckpt.save(Path(name).stem, iteration=iteration)
    (folder / "last_checkpoint").unlink(missing_ok=True)  # the checkpointer's bookkeeping, not the users'
    saved = torch.load(folder / name, map_location="cpu", weights_only=True)  # loadable safely, as the server must
    print(f"  {name}: keys {sorted(saved)}")
    return name


# ----------------------------------------------------------------------------- reference answers


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def detections_json(instances: Any) -> dict[str, Any]:
    boxes = instances.pred_boxes.tensor.numpy().astype(np.float32)
    scores = instances.scores.numpy().astype(np.float32)
    classes = instances.pred_classes.numpy().astype(np.int64)
    masks = instances.pred_masks.numpy().astype(bool)
    return {"boxes": [[float(v) for v in b] for b in boxes], "scores": [float(s) for s in scores],
            "classes": [int(c) for c in classes], "class_ids": [int(c) + 1 for c in classes],
            "masks": [encode_rle(m) for m in masks]}


def write_images(out: Path) -> list[dict[str, Any]]:
    folder = out / "images"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rows = []
    for seed, w, h in IMAGES:
        scene = generate_scene(seed, w, h)
        stem = f"scene{seed}_{w}x{h}"
        color, depth = folder / f"{stem}.color.png", folder / f"{stem}.depth.png"
        cv2.imwrite(str(color), np.ascontiguousarray(scene.color[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        cv2.imwrite(str(depth), scene.depth, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        rows.append({"name": stem, "seed": seed, "width": w, "height": h, "color": f"../images/{color.name}",
                     "depth": f"../images/{depth.name}", "gt_instances": int(len(scene.masks))})
    return rows


def make_model(spec: ModelSpec, out: Path, images: list[dict[str, Any]], command: str) -> dict[str, Any]:
    import detectron2
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    folder = out / spec.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for rel, text in spec.yaml_files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    (folder / "categories.txt").write_text("\n".join(CATEGORIES) + "\n")

    cfg = get_cfg()
    cfg.merge_from_file(str(folder / spec.config_file))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    model = build_model(cfg)
    model.eval()

    # Calibration runs the model exactly as DefaultPredictor would (resize, format, node_config's values).
    run_cfg = cfg.clone()
    run_cfg.INPUT.MIN_SIZE_TEST = spec.node_min_size
    run_cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = spec.node_score
    aug = T.ResizeShortestEdge([run_cfg.INPUT.MIN_SIZE_TEST] * 2, run_cfg.INPUT.MAX_SIZE_TEST)
    samples = [make_sample(seed, w, h, spec.depth, cfg.INPUT.FORMAT, aug) for seed, w, h in CALIBRATION_SEEDS]
    model.roi_heads.box_predictor.test_score_thresh = spec.node_score

    def run() -> list[Any]:
        with torch.no_grad():
            return [model([smp.input])[0] for smp in samples]

    with torch.no_grad():
        calib = calibrate(model, samples, run, gen)
    model.roi_heads.box_predictor.test_score_thresh = cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST

    trainer, optimizer, scheduler = train_steps(model, cfg, spec.depth)
    weight_name = save_weights(spec, folder, model, trainer, optimizer, scheduler)
    dump_cfg = cfg.clone()
    dump_cfg.MODEL.WEIGHTS = weight_name
    (folder / "config_dump.yaml").write_text(dump_cfg.dump())
    node = {"DETECTION_TYPE": spec.detection_type, "MODEL_WEIGHT": weight_name, "CONFIG_FILE": spec.config_file,
            "MIN_SIZE": spec.node_min_size, "SCORE_THRESH_TEST": spec.node_score, "CATEGORY_FILE": "categories.txt"}
    (folder / "node_config.json").write_text(json.dumps(node, indent=2) + "\n")

    # The reference: a fresh DefaultPredictor that reads the saved file, with node_config's values.
    run_cfg.MODEL.WEIGHTS = str(folder / weight_name)
    predictor = DefaultPredictor(run_cfg)
    results = []
    for row in images:
        color_bgr, depth = read_image_files(folder / row["color"], folder / row["depth"] if spec.depth else None)
        pred = predictor(predictor_input(color_bgr, depth))["instances"].to("cpu")
        h, w = color_bgr.shape[:2]
        tf = predictor.aug.get_transform(color_bgr)
        new_h, new_w = tf.new_h, tf.new_w
        results.append({"name": row["name"], "seed": row["seed"], "width": w, "height": h,
                        "color": row["color"], "depth": row["depth"] if spec.depth else None,
                        "resized": [int(new_w), int(new_h)], "detections": detections_json(pred)})

    expected = {
        "about": "detectron2's answers for this folder; made by scripts/make_detectron2_fixtures.py",
        "command": command,
        "versions": {"detectron2": detectron2.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "opencv": cv2.__version__},
        "detection_type": spec.detection_type,
        "input": ("float32 H x W x 4: B, G, R (0-255), depth metres (16-bit PNG mm / 1000, 0 = missing)"
                  if spec.depth else "uint8 H x W x 3 BGR (cv2.imread)"),
        "min_size": spec.node_min_size, "max_size": int(run_cfg.INPUT.MAX_SIZE_TEST),
        "score_threshold": spec.node_score, "categories": CATEGORIES,
        "checkpoint_layout": spec.layout, "notes": spec.notes, "calibration": calib,
        "images": results,
    }
    (folder / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return expected


def summarize(name: str, expected: dict[str, Any]) -> None:
    from pycocotools import mask as mask_util

    for img in expected["images"]:
        det = img["detections"]
        s = np.asarray(det["scores"])
        areas = np.asarray([mask_util.area(m) for m in det["masks"]], np.float64)
        b = np.asarray(det["boxes"]).reshape(-1, 4)
        box_areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        fill = areas / np.maximum(box_areas, 1)
        classes = np.bincount(np.asarray(det["classes"], np.int64), minlength=len(CATEGORIES))
        print(f"  {name:8s} {img['name']:22s} -> {img['resized'][0]}x{img['resized'][1]}: {len(s):3d} detections, "
              f"scores {s.min() if len(s) else 0:.3f}..{s.max() if len(s) else 0:.3f} "
              f"(median {np.median(s) if len(s) else 0:.3f}), classes {classes.tolist()}, "
              f"mask px median {np.median(areas) if len(s) else 0:.0f}, "
              f"mask/box {np.median(fill) if len(s) else 0:.2f}")


# ----------------------------------------------------------------------------- checking the committed files


#: Plausible mistakes an implementation could make, applied to detectron2 itself: the parity bounds must
#: reject each of them on at least one fixture model, or they would not catch it in the project either.
PERTURBATIONS = ("min_size+32", "cv2_resize", "roialign_v1", "anchor_offset_flip", "depth_in_mm")
#: A harmless difference (every parameter and FrozenBN statistic times 1 + N(0, 1e-5), well above what
#: another fp32 implementation's rounding does): the bounds must accept it on every fixture model.
BENIGN = ("weight_noise_1e-5",)
#: Reported only: how much more noise the fixtures tolerate. They are sensitive on purpose (sharpened
#: logits on weak features): 1e-4 already breaks the score bound, so TF32 (~5e-4 relative) or bf16
#: (~4e-3) arithmetic cannot pass on them; compare such engines on trained models.
INFORMATIVE = ("weight_noise_1e-4", "weight_noise_1e-3")


def folder_predictor(folder: Path, perturbation: str | None = None) -> tuple[Any, Callable[[Any], Any]]:
    """detectron2 on a fixture folder as the server must read it (node_config over the YAML), optionally
    with one PERTURBATIONS mistake. Returns (node_config, predict(image entry of expected.json))."""
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    node = json.loads((folder / "node_config.json").read_text())
    cfg = get_cfg()
    cfg.merge_from_file(str(folder / node["CONFIG_FILE"]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = str(folder / node["MODEL_WEIGHT"])
    cfg.INPUT.MIN_SIZE_TEST = int(node["MIN_SIZE"]) + (32 if perturbation == "min_size+32" else 0)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(node["SCORE_THRESH_TEST"])
    if perturbation == "anchor_offset_flip":
        cfg.MODEL.ANCHOR_GENERATOR.OFFSET = 0.5 - cfg.MODEL.ANCHOR_GENERATOR.OFFSET
    depth = node["DETECTION_TYPE"].startswith("RGBD")
    predictor = DefaultPredictor(cfg)
    if perturbation is not None and perturbation.startswith("weight_noise_"):
        eps = float(perturbation.rsplit("_", 1)[1])
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for t in predictor.model.state_dict().values():
                if t.is_floating_point():
                    t.mul_(1 + eps * torch.randn(t.shape, generator=gen))
    if perturbation == "roialign_v1":
        for pooler in (predictor.model.roi_heads.box_pooler, predictor.model.roi_heads.mask_pooler):
            for level in pooler.level_poolers:
                level.aligned = False

    def predict(entry: dict[str, Any]) -> Any:
        color_bgr, depth_mm = read_image_files(folder / entry["color"], folder / entry["depth"] if depth else None)
        img = predictor_input(color_bgr, depth_mm)
        if perturbation == "depth_in_mm" and depth:
            img[..., 3] *= 1000.0
        if perturbation != "cv2_resize":
            return predictor(img)["instances"].to("cpu")
        if cfg.INPUT.FORMAT == "RGB":
            img = img[:, :, ::-1]
        tf = predictor.aug.get_transform(img)
        resized = cv2.resize(np.ascontiguousarray(img), (tf.new_w, tf.new_h), interpolation=cv2.INTER_LINEAR)
        x = torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))
        with torch.no_grad():
            return predictor.model([{"image": x, "height": img.shape[0], "width": img.shape[1]}])[0]["instances"]

    return node, predict


def check(out: Path) -> int:
    """detectron2, run again on the committed folders, must give the committed answers (tests/parity.py's
    bounds, and in fact exactly), as must detectron2 with BENIGN noise; each of PERTURBATIONS must break
    the bounds on at least one folder."""
    from tests import parity

    folders = sorted(f for f in out.iterdir() if (f / "node_config.json").is_file())
    status = 0
    caught: dict[str, list[str]] = {p: [] for p in PERTURBATIONS}
    for folder in folders:
        expected = json.loads((folder / "expected.json").read_text())
        ref = [parity.from_expected(e) for e in expected["images"]]
        names = [e["name"] for e in expected["images"]]
        for perturbation in (None, *BENIGN, *PERTURBATIONS, *INFORMATIVE):
            node, predict = folder_predictor(folder, perturbation)
            cand = [parity.from_expected({**e, "detections": detections_json(predict(e))}) for e in expected["images"]]
            metrics = parity.compare(ref, cand, float(node["SCORE_THRESH_TEST"]), names=names)
            bad = parity.failures(metrics)
            label = perturbation or "as committed"
            print(f"{folder.name:8s} {label:20s} {'FAILS' if bad else 'passes'}: {parity.summary(metrics)}")
            if (perturbation is None or perturbation in BENIGN) and bad:
                status = 1
                print(f"  {label}: must pass: " + "; ".join(bad))
            if perturbation in PERTURBATIONS and bad:
                caught[perturbation].append(folder.name)
    for perturbation, where in caught.items():
        print(f"{perturbation:20s} caught on: {', '.join(where) or 'NONE'}")
        if not where:
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "detectron2")
    p.add_argument("--only", nargs="*", default=None, help="make only these models (names in MODELS)")
    p.add_argument("--check", action="store_true",
                   help="make nothing: run detectron2 on the folders in --out and compare with their expected.json "
                        "(must pass), and with each of PERTURBATIONS (each must fail on some folder)")
    args = p.parse_args(argv)
    try:
        import detectron2  # noqa: F401
    except ImportError:
        print("detectron2 is not importable: put its source on PYTHONPATH (PYTHONPATH=/path/to/detectron2 ...)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if args.check:
        return check(args.out)
    command = "PYTHONPATH=/work/d2src python scripts/make_detectron2_fixtures.py --out tests/fixtures/detectron2"
    args.out.mkdir(parents=True, exist_ok=True)
    images = write_images(args.out)
    for spec in MODELS:
        if args.only is not None and spec.name not in args.only:
            continue
        print(f"{spec.name}: building, calibrating, saving, predicting ...", flush=True)
        expected = make_model(spec, args.out, images, command)
        summarize(spec.name, expected)
    print("\nwritten:")
    total = 0
    for f in sorted(args.out.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"  {f.relative_to(args.out)}  {f.stat().st_size / 1e3:.1f} kB")
    print(f"total {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
