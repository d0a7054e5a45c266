#!/usr/bin/env python3
"""Train a detectron2 Mask R-CNN R50-FPN from scratch on dd.synth scenes, with detectron2's own trainer.

Why: the fast GPU engine must answer as the CPU reference engine does on the users' detectron2 models
(issue #13), and fast vs eager must be shown on a *trained* R50 (issue #18): random or calibrated weights
have near-tied scores, so rounding flips their answers and proves little. No detectron2 model can be
downloaded here, so this script makes one the way the users made theirs: detectron2's build_model,
its optimizer parameter groups, its training-data loader, its SimpleTrainer / AMPTrainer with its hooks,
and its DetectionCheckpointer (a trainer checkpoint: model, trainer{iteration, optimizer, hooks,
grad_scaler}, iteration). It writes the users' folder layout:

    OUT/
      node_config.json        the seed's six keys only (DETECTION_TYPE, MODEL_WEIGHT, CONFIG_FILE, MIN_SIZE,
                              SCORE_THRESH_TEST, CATEGORY_FILE)
      depallet_r50.yaml       CONFIG_FILE, with `_BASE_: Base-RCNN-FPN-BN.yaml` beside it
      Base-RCNN-FPN-BN.yaml   detectron2's Base-RCNN-FPN with batch norm (NORM "BN") and nothing frozen
      model_final.pth         DetectionCheckpointer's trainer checkpoint
      categories.txt
      train_info.json         settings, speed, losses, and the held-out check below
      expected.json, images/  (with --reference-scenes N) detectron2's own DefaultPredictor answers on N
                              held-out scenes, fp32 (TF32 off), in tests/fixtures/detectron2's format, so
                              `python -m tests.parity OUT --reference expected ...` compares any engine with
                              detectron2 itself on them

Settings, and why (the run is ~3.5 minutes on one H200):
  - NORM "BN" with batch statistics in training (FrozenBN is a constant affine map: useless from scratch;
    GN is refused by the server's loader) and FREEZE_AT 0; the FPN and heads without norms (as detectron2's
    Base-RCNN-FPN); the server folds BN's running statistics at inference like FrozenBN's.
  - AdamW (lr 1e-3 (2e-3 diverged at step 65 on the H200), weight decay 0.05, none on norms and biases) through detectron2's
    get_default_optimizer_params: it converged on these scenes in minutes for the demo models
    (scripts/train_demo.py); detectron2's SGD (--optimizer sgd) is slower from scratch.
  - linear warm-up, then a cosine to 1% over the time (or step) budget.
  - AMP (fp16 autocast + GradScaler: detectron2's AMPTrainer) on a GPU.
  - scenes drawn on the fly by dd.synth in DataLoader workers at the training size itself (16:9, shorter
    side from INPUT.MIN_SIZE_TRAIN; by default one size, 640: a 1280x720 camera image as the server
    resizes it, 1138x640), flipped and photometrically jittered as the demo models were
    (scripts/train_demo.py's augment); nothing to download or store. One size because batch norm's
    statistics see the zero padding of mixed sizes in a batch, which a single image at test time lacks.
  - input as the users' RGB-D models: float32 B, G, R (0-255), D = depth in metres (missing = 0), with
    PIXEL_MEAN/STD of four values; RGB models get the BGR uint8 image (INPUT.FORMAT BGR).

Typical runs:

    PYTHONPATH=/path/to/detectron2 python scripts/train_detectron2.py --out /tmp/d2rgbd --minutes 3.5
    PYTHONPATH=/work/d2src python scripts/train_detectron2.py --out /tmp/d2tiny --device cpu --iters 2 --tiny

detectron2 is imported only by this script (its source on PYTHONPATH, nothing compiled).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from dd.synth.scenes import CATEGORIES, generate_scene  # noqa: E402
from scripts.make_detectron2_fixtures import detections_json, predictor_input  # noqa: E402
from scripts.train_demo import EVAL_SEED_BASE, augment  # noqa: E402

#: detectron2's Base-RCNN-FPN.yaml with batch norm everywhere in the ResNet and nothing frozen.
BASE_YAML = """\
# detectron2's Base-RCNN-FPN.yaml, trained from scratch: batch norm (NORM "BN", batch statistics in
# training) in the whole ResNet, nothing frozen (FREEZE_AT 0). The FPN and the heads have no norms.
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  MASK_ON: True
  BACKBONE:
    NAME: "build_resnet_fpn_backbone"
    FREEZE_AT: 0
  RESNETS:
    DEPTH: 50
    NORM: "BN"
    STRIDE_IN_1X1: False
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
  FPN:
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
  ANCHOR_GENERATOR:
    SIZES: [[32], [64], [128], [256], [512]]
    ASPECT_RATIOS: [[0.5, 1.0, 2.0]]
  RPN:
    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
    PRE_NMS_TOPK_TRAIN: 2000
    PRE_NMS_TOPK_TEST: 1000
    POST_NMS_TOPK_TRAIN: 1000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "StandardROIHeads"
    IN_FEATURES: ["p2", "p3", "p4", "p5"]
  ROI_BOX_HEAD:
    NAME: "FastRCNNConvFCHead"
    NUM_FC: 2
    POOLER_RESOLUTION: 7
  ROI_MASK_HEAD:
    NAME: "MaskRCNNConvUpsampleHead"
    NUM_CONV: 4
    POOLER_RESOLUTION: 14
INPUT:
  MASK_FORMAT: "bitmask"
VERSION: 2
"""

BASE_NAME = "Base-RCNN-FPN-BN.yaml"
CONFIG_NAME = "depallet_r50.yaml"
WEIGHTS_STEM = "model_final"

#: Colour statistics in 0-255, B, G, R (detectron2's usual BGR means; stds of real images), then depth in
#: metres (valid pixels of generated scenes: mean 2.40 m, std 0.50 m; missing depth stays 0).
PIXEL_MEAN_BGR = [103.53, 116.28, 123.675]
PIXEL_STD_BGR = [57.375, 57.12, 58.395]
DEPTH_MEAN_M = 2.4
DEPTH_STD_M = 0.5

#: --tiny: a narrow R50-FPN (every code path of the real one) on small images, for CPU smoke tests.
TINY_MODEL = {"RESNETS": {"WIDTH_PER_GROUP": 8, "RES2_OUT_CHANNELS": 32, "STEM_OUT_CHANNELS": 16},
              "FPN": {"OUT_CHANNELS": 32}, "ROI_BOX_HEAD": {"FC_DIM": 64}, "ROI_MASK_HEAD": {"CONV_DIM": 32}}

#: Aspect ratio (width / height) of the generated training scenes: the cameras' 1280x720. One ratio (and by
#: default one size): mixed sizes in a batch are zero-padded to the largest, and batch norm's training
#: statistics would count that padding, which a single image at test time does not have.
ASPECT = 16 / 9


# ----------------------------------------------------------------------------- the model folder's files


def yaml_list(values: list[Any]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def main_yaml(args: argparse.Namespace, max_iter: int) -> str:
    """CONFIG_FILE: what differs from the base, as a user writes it (training and test settings)."""
    mean, std = list(PIXEL_MEAN_BGR), list(PIXEL_STD_BGR)
    if args.kind == "rgbd":
        mean.append(DEPTH_MEAN_M)
        std.append(DEPTH_STD_M)
    lines = [f'_BASE_: "{BASE_NAME}"',
             "# Made by scripts/train_detectron2.py: " + ("B, G, R (0-255) and depth in metres (missing = 0)"
                                                           if args.kind == "rgbd" else "BGR (0-255)"),
             "MODEL:",
             f"  PIXEL_MEAN: {yaml_list(mean)}",
             f"  PIXEL_STD: {yaml_list(std)}"]
    if args.tiny:
        for section, keys in TINY_MODEL.items():
            lines.append(f"  {section}:")
            lines += [f"    {k}: {v}" for k, v in keys.items()]
    lines += ["  ROI_HEADS:",
              f"    NUM_CLASSES: {len(CATEGORIES)}",
              f"    SCORE_THRESH_TEST: {args.score_thresh}",
              "INPUT:",
              '  FORMAT: "BGR"',
              f"  MIN_SIZE_TRAIN: {yaml_list(args.train_sizes)}",
              f"  MAX_SIZE_TRAIN: {args.max_size}",
              f"  MIN_SIZE_TEST: {args.min_size}",
              f"  MAX_SIZE_TEST: {args.max_size}",
              "DATALOADER:",
              f"  NUM_WORKERS: {args.workers}",
              "SOLVER:",
              f"  # {'AdamW' if args.optimizer == 'adamw' else 'SGD'}"
              + (" (detectron2's parameter groups, torch.optim.AdamW)" if args.optimizer == "adamw" else "")
              + "; linear warm-up, then cosine to 1% over the run",
              '  LR_SCHEDULER_NAME: "WarmupCosineLR"',
              f"  IMS_PER_BATCH: {args.batch}",
              f"  BASE_LR: {args.lr}",
              f"  WEIGHT_DECAY: {args.weight_decay}",
              "  WEIGHT_DECAY_NORM: 0.0",
              "  WEIGHT_DECAY_BIAS: 0.0",
              f"  MAX_ITER: {max_iter}",
              "  STEPS: []",
              f"  WARMUP_ITERS: {args.warmup}",
              f"  CHECKPOINT_PERIOD: {max(max_iter, 1)}",
              "  AMP:",
              f"    ENABLED: {args.amp}",
              f"SEED: {args.seed}",
              ""]
    return "\n".join(lines)


def write_folder_files(out: Path, args: argparse.Namespace, max_iter: int) -> None:
    (out / BASE_NAME).write_text(BASE_YAML)
    (out / CONFIG_NAME).write_text(main_yaml(args, max_iter))
    (out / "categories.txt").write_text("\n".join(CATEGORIES) + "\n")
    node = {"DETECTION_TYPE": "RGBDMaskRCNNTorchServicer" if args.kind == "rgbd" else "RGBMaskRCNNTorchServicer",
            "MODEL_WEIGHT": WEIGHTS_STEM + ".pth", "CONFIG_FILE": CONFIG_NAME, "MIN_SIZE": args.min_size,
            "SCORE_THRESH_TEST": args.score_thresh, "CATEGORY_FILE": "categories.txt"}
    (out / "node_config.json").write_text(json.dumps(node, indent=2) + "\n")


def load_cfg(out: Path, device: str) -> Any:
    """The config exactly as detectron2 reads the written YAML (get_cfg + merge_from_file)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(out / CONFIG_NAME))
    cfg.MODEL.DEVICE = device
    return cfg


# ----------------------------------------------------------------------------- data


class SceneMapper:
    """Seed -> one training sample in detectron2's format ({"image", "instances", "height", "width"}).

    The scene is rendered at the training size itself (16:9, shorter side drawn from sizes), so no
    resize is needed (dd.synth scales the scene with the image: a smaller render is the same view);
    everything drawn comes from the seed, so the data are reproducible whatever the number of workers.
    Runs in the DataLoader's workers.
    """

    def __init__(self, kind: str, sizes: list[int], max_size: int, augment: bool) -> None:
        self.kind, self.sizes, self.max_size, self.augment = kind, list(sizes), max_size, augment
        self._threads_set = False

    def size(self, rng: np.random.Generator) -> tuple[int, int]:
        short = int(rng.choice(self.sizes))
        long = min(int(short * ASPECT + 0.5), self.max_size)  # as ResizeShortestEdge rounds 1280x720
        return long, short  # width, height: landscape, as the cameras

    def __call__(self, seed: int) -> dict[str, Any]:
        from detectron2.structures import BitMasks, Boxes, Instances

        if not self._threads_set:  # many workers: one thread each
            torch.set_num_threads(1)
            self._threads_set = True
        rng = np.random.default_rng([int(seed), 0xD2])
        w, h = self.size(rng)
        sc = generate_scene(int(seed), w, h)
        if self.augment:
            color, depth_m, masks, boxes = augment(sc.color, sc.depth, sc.masks, sc.boxes, rng)
        else:
            color, masks, boxes = sc.color, sc.masks, sc.boxes
            depth_m = sc.depth.astype(np.float32) / np.float32(1000.0)
        bgr = np.ascontiguousarray(color[..., ::-1])
        if self.kind == "rgbd":
            img = np.concatenate([bgr.astype(np.float32), depth_m[..., None].astype(np.float32)], axis=2)
        else:
            img = bgr
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4))
        inst.gt_classes = torch.as_tensor(np.asarray(sc.labels, np.int64) - 1)  # dd.synth: 1-based, one class
        inst.gt_masks = BitMasks(torch.from_numpy(np.ascontiguousarray(masks)))
        return {"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), "instances": inst,
                "height": h, "width": w, "seed": int(seed)}


def fit_workers(workers: int, batch: int, sizes: list[int], kind: str, prefetch: int) -> tuple[int, int]:
    """Workers x prefetched batches that fit in half of /dev/shm's free space (where finished batches wait).

    A batch of 1138x640 RGB-D scenes is ~300 MB (float32 4-channel images, ~10 full-size masks each); a
    small /dev/shm (containers' 64 MB) would otherwise end the run with a bus error instead of a message.
    """
    if workers == 0:
        return 0, prefetch
    short = max(sizes)
    per_px = (16 if kind == "rgbd" else 3) + 12  # image + masks (bool, ~10 a scene) + slack
    per_batch = batch * short * int(short * 16 / 9) * per_px
    try:
        free = shutil.disk_usage("/dev/shm").free // 2
    except OSError:
        return workers, prefetch
    fit = max(1, min(workers, free // max(1, per_batch * prefetch)))
    if fit < workers:
        prefetch = 1
        fit = max(1, min(workers, free // max(1, per_batch)))
        print(f"warning: /dev/shm has {2 * free / 2**30:.1f} GiB free: {fit} workers, prefetch 1", flush=True)
    return int(fit), prefetch


# ----------------------------------------------------------------------------- training


def make_optimizer(cfg: Any, model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    """detectron2's parameter groups (no weight decay on norms and biases) for AdamW; its SGD otherwise."""
    from detectron2.solver import build_optimizer
    from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

    if name == "sgd":
        return build_optimizer(cfg, model)
    params = get_default_optimizer_params(model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                                          weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                                          weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=cfg.SOLVER.BASE_LR,
                                                               weight_decay=cfg.SOLVER.WEIGHT_DECAY)


def make_schedule(progress: Callable[[int], float], warmup: int, max_iter: int, warmup_factor: float = 0.001,
                  floor: float = 0.01) -> Any:
    """A fvcore ParamScheduler for detectron2's LRMultiplier(max_iter=max_iter): linear warm-up over `warmup`
    steps, then a cosine from 1 to `floor` over progress(step) in [0, 1] (elapsed time / time budget, or
    step / steps), so that a time budget ends at the schedule's end whatever the speed."""
    from fvcore.common.param_scheduler import ParamScheduler

    class WarmupCosineOverBudget(ParamScheduler):
        def __call__(self, where: float) -> float:  # where = step / max_iter (LRMultiplier)
            step = int(round(where * max_iter))
            warm = 1.0 if step >= warmup else warmup_factor + (1 - warmup_factor) * step / max(1, warmup)
            p = min(max(progress(step), 0.0), 1.0)
            return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))

    return WarmupCosineOverBudget()


def train(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_train_loader
    from detectron2.data.samplers import TrainingSampler
    from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
    from detectron2.modeling import build_model
    from detectron2.solver.lr_scheduler import LRMultiplier
    from detectron2.utils.events import CommonMetricPrinter, EventStorage, JSONWriter

    write_folder_files(out, args, args.iters or 0)
    cfg = load_cfg(out, args.device)
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f} M parameters, {args.kind}, input channels {len(cfg.MODEL.PIXEL_MEAN)}, "
          f"norm {cfg.MODEL.RESNETS.NORM}, device {args.device}", flush=True)

    workers, prefetch = fit_workers(args.workers, args.batch, args.train_sizes, args.kind, 2)
    mapper = SceneMapper(args.kind, args.train_sizes, args.max_size, augment=not args.no_augment)
    seeds = list(range(args.seed * 1_000_000, args.seed * 1_000_000 + 200_000))
    assert seeds[-1] < EVAL_SEED_BASE, "training seeds must stay below the held-out scenes"
    loader = build_detection_train_loader(seeds, mapper=mapper, sampler=TrainingSampler(len(seeds), seed=args.seed),
                                          total_batch_size=args.batch, num_workers=workers,
                                          aspect_ratio_grouping=False, prefetch_factor=prefetch)

    optimizer = make_optimizer(cfg, model, args.optimizer)
    if args.amp:  # torch.amp's GradScaler: torch.cuda.amp's (AMPTrainer's default) is deprecated
        trainer = AMPTrainer(model, loader, optimizer, grad_scaler=torch.amp.GradScaler("cuda"))
    else:
        trainer = SimpleTrainer(model, loader, optimizer)

    t0 = [0.0]
    budget_s = args.minutes * 60.0 if args.minutes else None

    def progress(step: int) -> float:
        if budget_s is not None:
            return (time.perf_counter() - t0[0]) / budget_s if t0[0] else 0.0
        return step / max(1, args.iters)

    big = 10**7  # LRMultiplier's max_iter; the schedule ignores it (the budget decides)
    scheduler = LRMultiplier(optimizer, multiplier=make_schedule(progress, args.warmup, big), max_iter=big)
    metrics_file = out / "metrics.json"
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(optimizer, scheduler),
        hooks.PeriodicWriter([CommonMetricPrinter(args.iters or None), JSONWriter(str(metrics_file))],
                             period=args.log_every),
    ])

    # detectron2's TrainerBase.train loop, with a time budget as well as a step budget.
    trainer.iter = trainer.start_iter = 0
    trainer.max_iter = args.iters or big
    steps = skipped = 0
    first_step_s = None
    with EventStorage(0) as trainer.storage:
        trainer.before_train()
        try:
            t0[0] = time.perf_counter()
            while steps < trainer.max_iter:
                if budget_s is not None and time.perf_counter() - t0[0] >= budget_s:
                    break
                trainer.iter = steps
                trainer.before_step()
                try:
                    trainer.run_step()
                except FloatingPointError as exc:  # detectron2's check of the losses, before the optimizer step
                    skipped += 1
                    print(f"step {steps} skipped: {exc}", flush=True)
                    if skipped > 10:
                        raise
                    trainer.after_step()  # the hooks' timers were resumed in before_step: pause them
                    continue
                trainer.after_step()
                steps += 1
                if steps == 1:
                    first_step_s = time.perf_counter() - t0[0]
        finally:
            train_s = time.perf_counter() - t0[0]
            # as detectron2's loop leaves it: iter == max_iter tells the hooks that training finished
            trainer.iter = steps
            trainer.max_iter = steps
            trainer.after_train()
    last = steps - 1
    trainer.iter = last  # as after PeriodicCheckpointer's last step: the last step run
    losses = {k: float(v.median(20)) for k, v in trainer.storage.histories().items()
              if "loss" in k or k == "lr"}
    # The written YAML records the steps actually run (a time budget decides them).
    (out / CONFIG_NAME).write_text(main_yaml(args, steps))
    model.eval()
    ckpt = DetectionCheckpointer(model, str(out), trainer=trainer)
    ckpt.save(WEIGHTS_STEM, iteration=last)
    (out / "last_checkpoint").unlink(missing_ok=True)  # the checkpointer's bookkeeping, not the users'
    size = (out / f"{WEIGHTS_STEM}.pth").stat().st_size
    saved = torch.load(out / f"{WEIGHTS_STEM}.pth", map_location="cpu", weights_only=True)  # as the server loads it
    print(f"saved {WEIGHTS_STEM}.pth ({size / 1e6:.0f} MB): keys {sorted(saved)}, trainer keys "
          f"{sorted(saved.get('trainer', {}))}, iteration {saved.get('iteration')}", flush=True)
    del saved
    images = steps * args.batch
    info = {"steps": steps, "images": images, "train_s": train_s, "first_step_s": first_step_s,
            "images_per_s": images / train_s if train_s else None,
            "steps_per_s": (steps - 1) / (train_s - first_step_s) if first_step_s and steps > 1 else None,
            "final_median_losses": losses, "skipped_non_finite_steps": skipped, "workers": workers,
            "prefetch": prefetch, "parameters": n_params, "checkpoint_bytes": size}
    print(f"trained {steps} steps x {args.batch} scenes in {train_s:.0f} s "
          f"({info['images_per_s'] or 0:.1f} scenes/s; first step {first_step_s or 0:.1f} s); "
          f"final losses " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(losses.items())), flush=True)
    del trainer, loader, optimizer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return info


# ----------------------------------------------------------------------------- held-out check and reference


def mask_iou_matrix(pred: torch.Tensor, gt: np.ndarray) -> np.ndarray:
    """Mask IoU of every prediction (N x H x W bool, on the predictor's device) with every ground truth."""
    if len(pred) == 0 or len(gt) == 0:
        return np.zeros((len(pred), len(gt)))
    p = pred.reshape(len(pred), -1).float()
    g = torch.from_numpy(gt.reshape(len(gt), -1)).to(p.device).float()
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    return (inter / union.clamp_min(1)).cpu().numpy()


def reference(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """detectron2's DefaultPredictor (fp32, TF32 off) on held-out scenes: a quality check against the scenes'
    ground truth, and (--reference-scenes) expected.json + images/ for tests.parity."""
    from detectron2.engine import DefaultPredictor

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    node = json.loads((out / "node_config.json").read_text())
    cfg = load_cfg(out, args.device)
    cfg.MODEL.WEIGHTS = str(out / node["MODEL_WEIGHT"])
    cfg.INPUT.MIN_SIZE_TEST = int(node["MIN_SIZE"])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(node["SCORE_THRESH_TEST"])
    predictor = DefaultPredictor(cfg)  # reads the saved checkpoint, as a user's code does
    w, h = (int(v) for v in args.test_size.lower().split("x"))
    count = max(args.reference_scenes, args.check_scenes)
    img_dir = out / "images"
    if args.reference_scenes:
        img_dir.mkdir(exist_ok=True)
    entries, scores, ious, n_gt, n_det, n_tp, times = [], [], [], 0, 0, 0, []
    for k in range(count):
        seed = EVAL_SEED_BASE + k
        sc = generate_scene(seed, w, h)
        bgr = np.ascontiguousarray(sc.color[..., ::-1])
        inp = predictor_input(bgr, sc.depth if args.kind == "rgbd" else None)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        inst = predictor(inp)["instances"]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        iou = mask_iou_matrix(inst.pred_masks, sc.masks)
        inst = inst.to("cpu")
        s = inst.scores.numpy()
        taken: set[int] = set()
        for i in np.argsort(-s, kind="stable"):  # greedy by score, mask IoU >= 0.5 (COCO's AP50 rule)
            row = [(iou[i, j], j) for j in range(len(sc.masks)) if j not in taken and iou[i, j] >= 0.5]
            if row:
                best, j = max(row)
                taken.add(j)
                ious.append(float(best))
        n_gt += len(sc.masks)
        n_det += len(s)
        n_tp += len(taken)
        scores.append(s)
        if k < args.reference_scenes:
            name = f"scene{seed}_{w}x{h}"
            cv2.imwrite(str(img_dir / f"{name}.color.png"), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            entry = {"name": name, "seed": seed, "width": w, "height": h, "color": f"images/{name}.color.png",
                     "depth": None, "detections": detections_json(inst)}
            if args.kind == "rgbd":
                cv2.imwrite(str(img_dir / f"{name}.depth.png"), sc.depth, [cv2.IMWRITE_PNG_COMPRESSION, 1])
                entry["depth"] = f"images/{name}.depth.png"
            entries.append(entry)
    all_s = np.concatenate(scores) if scores else np.zeros(0)
    thr = float(node["SCORE_THRESH_TEST"])
    check = {
        "scenes": count, "size": [w, h], "ground_truth": n_gt, "detections": n_det,
        "recall_mask_iou_0.5": n_tp / n_gt if n_gt else None, "precision_mask_iou_0.5": n_tp / n_det if n_det else None,
        "matched_mask_iou_mean": float(np.mean(ious)) if ious else None,
        "score_median": float(np.median(all_s)) if len(all_s) else None,
        "scores_at_least_0.9": float((all_s >= 0.9).mean()) if len(all_s) else None,
        f"scores_below_{thr + 0.1:.2f}": float((all_s < thr + 0.1).mean()) if len(all_s) else None,
        "predictor_ms_median": 1000 * float(np.median(times)) if times else None,
        "tf32": False,
    }
    print("held-out check (detectron2 DefaultPredictor, fp32): " + ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()), flush=True)
    if args.reference_scenes:
        import detectron2

        expected = {
            "about": "detectron2's DefaultPredictor answers on held-out dd.synth scenes; made by "
                     "scripts/train_detectron2.py after training",
            "versions": {"detectron2": detectron2.__version__, "torch": torch.__version__},
            "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
            "tf32": False, "detection_type": node["DETECTION_TYPE"],
            "input": ("float32 H x W x 4: B, G, R (0-255), depth metres (16-bit PNG mm / 1000, 0 = missing)"
                      if args.kind == "rgbd" else "uint8 H x W x 3 BGR (cv2.imread)"),
            "min_size": int(node["MIN_SIZE"]), "max_size": int(cfg.INPUT.MAX_SIZE_TEST), "score_threshold": thr,
            "categories": list(CATEGORIES), "images": entries,
        }
        (out / "expected.json").write_text(json.dumps(expected) + "\n")
    del predictor
    return check


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="model folder to write (emptied first)")
    p.add_argument("--kind", choices=("rgbd", "rgb"), default="rgbd")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (the step count follows)")
    p.add_argument("--iters", type=int, default=None, help="training steps (when no --minutes; default 400)")
    p.add_argument("--batch", type=int, default=16, help="scenes per step (SOLVER.IMS_PER_BATCH)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 AdamW, 0.04 SGD)")
    p.add_argument("--weight-decay", type=float, default=None, help="(default: 0.05 AdamW, 1e-4 SGD)")
    p.add_argument("--warmup", type=int, default=80, help="linear warm-up steps")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="fp16 autocast + GradScaler (detectron2's AMPTrainer); default: on for CUDA")
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                   help="DataLoader workers drawing scenes")
    p.add_argument("--train-sizes", type=int, nargs="+", default=[640],
                   help="INPUT.MIN_SIZE_TRAIN: shorter side(s) the 16:9 scenes are drawn at (several: mixed "
                        "sizes in a batch, zero-padded)")
    p.add_argument("--min-size", type=int, default=640, help="MIN_SIZE (node_config) and INPUT.MIN_SIZE_TEST")
    p.add_argument("--max-size", type=int, default=1333, help="INPUT.MAX_SIZE_TRAIN/TEST")
    p.add_argument("--score-thresh", type=float, default=0.5, help="SCORE_THRESH_TEST (node_config and YAML)")
    p.add_argument("--seed", type=int, default=0, help="weights' seed; training scenes from seed * 1e6 up")
    p.add_argument("--no-augment", action="store_true", help="train on the scenes as generated")
    p.add_argument("--tiny", action="store_true", help="a narrow R50-FPN (CPU smoke tests)")
    p.add_argument("--test-size", default="1280x720", help="held-out scenes' WIDTHxHEIGHT")
    p.add_argument("--reference-scenes", type=int, default=0,
                   help="write detectron2's answers on this many held-out scenes (expected.json, images/)")
    p.add_argument("--check-scenes", type=int, default=8, help="held-out scenes for the quality check")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the training process (0: default)")
    p.add_argument("--log-every", type=int, default=20)
    args = p.parse_args(argv)
    if args.minutes is None and args.iters is None:
        args.iters = 400
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adamw" else 0.04
    if args.weight_decay is None:
        args.weight_decay = 0.05 if args.optimizer == "adamw" else 1e-4
    if args.amp is None:
        args.amp = args.device.startswith("cuda")
    if args.amp and not args.device.startswith("cuda"):
        p.error("--amp needs a CUDA device (detectron2's AMPTrainer)")
    if args.tiny and args.train_sizes == p.get_default("train_sizes"):
        args.train_sizes = [160]
    if args.tiny and args.min_size == p.get_default("min_size"):
        args.min_size = 160
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import detectron2  # noqa: F401
    except ImportError:
        print("detectron2 is not importable: put its source on PYTHONPATH (PYTHONPATH=/path/to/detectron2 ...)",
              file=sys.stderr)
        return 2
    from detectron2.utils.logger import setup_logger

    setup_logger(name="detectron2", abbrev_name="d2", color=False)
    cv2.setNumThreads(1)  # before the DataLoader forks: OpenCV's pool in a forked child can deadlock
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; the reference below runs in fp32
        torch.backends.cudnn.allow_tf32 = True
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    info: dict[str, Any] = {"command": " ".join([sys.executable, *sys.argv]),
                            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                            "torch": torch.__version__, "device_name": (torch.cuda.get_device_name(0)
                                                                        if args.device.startswith("cuda") else
                                                                        platform.processor()),
                            "cpu_count": os.cpu_count()}
    info["training"] = train(args, out)
    if args.reference_scenes or args.check_scenes:
        info["held_out_check"] = reference(args, out)
    info["total_s"] = time.perf_counter() - started
    (out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out} in {info['total_s']:.0f} s: " + ", ".join(sorted(p.name for p in out.iterdir())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
