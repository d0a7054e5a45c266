#!/usr/bin/env python3
"""Train the demo Mask R-CNN (RGB-D or RGB) from scratch on generated scenes, into a model folder.

Why a script and not a notebook: the demo models ship in configs/models/, and anyone must be able
to remake them from a seed (no weights or data can be downloaded): the same seed gives the same
initial weights and the same batches in the same order whatever the number of workers; only GPU
kernels (atomic adds in RoIAlign's backward) and a --minutes budget (steps depend on speed; the
step count is recorded, replay it with --iters) keep two runs from being bit-identical. Every scene
is drawn on the fly by dd.synth from its seed, so there is no data set to store; training uses seeds
from --seed upward, evaluation seeds from 10_000_000 upward, so they never overlap.

The input the model learns on is exactly what the server feeds it (dd/worker/engines/
torchvision_maskrcnn.py): colour / 255, depth in metres as a fourth channel with missing pixels (0)
replaced by DEPTH_FILL, both normalised by the model's image_mean / image_std inside torchvision's
transform. The written node_config.json carries the very same numbers.

--arch r50 trains torchvision's maskrcnn_resnet50_fpn shape instead (the users' models, what the fast GPU
engine is built for), only to check the fast engine against eager fp32 on a model that has learnt
something (issue #18; scripts/check_trained_r50.sh runs both). From scratch, so the ResNet's frozen batch
norms (dd.models' choice, for fine-tuning) become trainable BatchNorm2d while training (live_batchnorm),
with each residual block's last BN scale at 0 so that 16 blocks start as the identity and train at once;
precise BN re-estimates their statistics at the end and the folder is written with the keys of the served,
frozen-BN model. The settings check_trained_r50.sh uses, for ~4 minutes on an H200: 1280x720 scenes
(what the check runs on), batch 8, MIN_SIZE 512 / MAX_SIZE 1333 (the network sees 512x910: ~2.4x fewer
pixels than 800, so ~2x the steps in the budget; cartons are large), bf16 backbone + channels-last +
cuDNN autotuning (one input shape, so the tuning pays; heads stay fp32), AdamW at 1e-3 (half the demo's
2e-3: 44 M parameters and a deeper net) with the usual 150-step warm-up and cosine decay along the clock.
The 15 MB and 150 ms bounds and the CPU timing are the demo's and are skipped for r50.

This file must stay importable on a training box without gRPC, ZeroMQ or pycocotools: it imports
only dd.models, dd.config and dd.synth. Typical runs:

    python scripts/train_demo.py --kind rgbd --out configs/models/demo-rgbd --device cuda --minutes 4.5
    python scripts/train_demo.py --kind rgb --out /tmp/m --device cpu --iters 20 --batch 2 --width 320 --height 240
    python scripts/train_demo.py --arch r50 --out /tmp/r50 --minutes 4 --batch 8 --width 1280 --height 720 \
        --min-size 512 --max-size 1333 --amp --channels-last --cudnn-benchmark
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from dd.config import DEFAULT_ARCHITECTURE, load_model_config  # noqa: E402
from dd.models.maskrcnn import build_maskrcnn, load_state_dict  # noqa: E402
from dd.models.model_folder import SMALL_ARCHITECTURE, write_model_folder  # noqa: E402
from dd.synth.scenes import CATEGORIES, generate_scene  # noqa: E402

#: Held-out scenes start here; training seeds must stay below (eval_demo.py uses the same base).
EVAL_SEED_BASE = 10_000_000

#: SMALL_ARCHITECTURE with a narrower FPN: the per-proposal RoI pooling and box head scale with it and
#: are a third of the CPU time at 1000 proposals. With MIN_SIZE 384 a 640x480 image with ~11 cartons
#: takes ~115 ms on one core (64 channels at 416: ~160 ms), well inside the 150 ms bound.
DEMO_ARCHITECTURE: dict[str, Any] = dict(SMALL_ARCHITECTURE, fpn_channels=48)

#: --arch: "demo" is the shipped CPU model; "r50" is torchvision's maskrcnn_resnet50_fpn shape (the users' models,
#: what the fast GPU engine is built for), trained only to check the fast engine against eager fp32 (issue #18).
ARCHITECTURES: dict[str, dict[str, Any]] = {"demo": DEMO_ARCHITECTURE, "r50": dict(DEFAULT_ARCHITECTURE)}

#: Normalisation, from the statistics of generated scenes (colour mean/std over 20 scenes; depth of
#: valid pixels: mean 2.40 m, std 0.50 m). Written to node_config.json, so the server uses the same.
PIXEL_MEAN = (0.56, 0.53, 0.48)
PIXEL_STD = (0.16, 0.15, 0.17)
DEPTH_MEAN = 2.4
DEPTH_STD = 0.5
DEPTH_FILL = DEPTH_MEAN  # missing depth becomes 0 after normalisation: "no information"

MAX_WEIGHTS_BYTES = 15 * 1000 * 1000
LATENCY_BOUND_MS = 150.0


# ----------------------------------------------------------------------------- data


def augment(scene_color: np.ndarray, scene_depth: np.ndarray, masks: np.ndarray, boxes: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flips, mild photometric jitter, JPEG artefacts and depth noise.

    Why these and not more: the scenes already vary camera height, lighting, products and sensor
    dropouts; what they lack is mirror symmetry (a top-down view has no preferred handedness), the
    colour drift and JPEG compression of real cameras and files (users send .jpg), and sensor-to-sensor
    differences in depth noise, offset and dropout rate.
    """
    h, w = scene_depth.shape
    color, depth = scene_color, scene_depth
    boxes = boxes.copy()
    if rng.random() < 0.5:
        color, depth, masks = color[:, ::-1], depth[:, ::-1], masks[:, :, ::-1]
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    if rng.random() < 0.5:
        color, depth, masks = color[::-1], depth[::-1], masks[:, ::-1]
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]

    img = color.astype(np.float32)
    mean = float(img.mean())
    img = (img - mean) * rng.uniform(0.85, 1.15) + mean  # contrast
    gray = img.mean(axis=2, keepdims=True)
    img = gray + (img - gray) * rng.uniform(0.8, 1.2)  # saturation
    img *= (rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3)).astype(np.float32)  # brightness, white balance
    color = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        ok, buf = cv2.imencode(".jpg", color[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
        if ok:
            color = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])

    d = depth.astype(np.float32) * np.float32(0.001)
    valid = d > 0
    d += np.float32(rng.uniform(-0.03, 0.03))  # calibration offset
    d += rng.standard_normal(d.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 0.003))
    drop = rng.random(d.shape, dtype=np.float32) < np.float32(rng.uniform(0.0, 0.02))
    d[~valid | drop] = 0.0
    return np.ascontiguousarray(color), d, np.ascontiguousarray(masks), boxes


class SceneBatches(IterableDataset):
    """Endless batches of freshly generated scenes; batch b holds seeds first + b*batch ... + batch-1.

    Batch b is made by worker b % workers and DataLoader reads workers round-robin, so the data seen
    at every step is the same whatever the number of workers: a run is reproducible from its seed.
    Masks travel bit-packed (8x smaller): a 640x480 scene has ~10 of them, and unpacked they would be
    most of the bytes crossing from the workers.
    """

    def __init__(self, first_seed: int, batch: int, kind: str, width: int, height: int, augment: bool) -> None:
        if width % 8:
            raise ValueError("--width must be a multiple of 8 (masks are bit-packed along rows)")
        self.first_seed, self.batch, self.kind = first_seed, batch, kind
        self.width, self.height, self.augment = width, height, augment

    def seeds(self, b: int) -> list[int]:
        start = self.first_seed + b * self.batch
        if start + self.batch > EVAL_SEED_BASE:
            raise RuntimeError(f"training seed reached {EVAL_SEED_BASE} (the held-out scenes); use a lower --seed")
        return list(range(start, start + self.batch))

    def make(self, b: int) -> dict[str, Any]:
        colors, depths, boxes, packed, labels = [], [], [], [], []
        for s in self.seeds(b):
            sc = generate_scene(s, self.width, self.height)
            color, masks, bx = sc.color, sc.masks, sc.boxes
            if self.augment:
                color, depth, masks, bx = augment(sc.color, sc.depth, sc.masks, sc.boxes,
                                                  np.random.default_rng([s, 0xA06]))
            else:
                depth = sc.depth.astype(np.float32) * np.float32(0.001)
            # int16 millimetres: half the bytes of float metres, the sensor's own resolution.
            depth = np.clip(np.rint(depth * 1000.0), 0, 32767).astype(np.int16)
            colors.append(torch.from_numpy(np.ascontiguousarray(color.transpose(2, 0, 1))))
            depths.append(torch.from_numpy(depth))
            boxes.append(torch.from_numpy(bx.astype(np.float32)))
            packed.append(torch.from_numpy(np.packbits(masks, axis=-1)))
            labels.append(torch.from_numpy(sc.labels))
        out: dict[str, Any] = {"color": torch.stack(colors), "boxes": boxes, "masks": packed, "labels": labels,
                               "batch": b}
        if self.kind == "rgbd":
            out["depth"] = torch.stack(depths)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        b, step = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            yield self.make(b)
            b += step


def _worker_init(_: int) -> None:
    """One thread per worker: the workers are many, and nested thread pools would only fight.

    OpenCV's pool is set to one thread in the parent (main) before any fork, not here: calling
    cv2.setNumThreads in a forked child whose parent had already started OpenCV threads deadlocks.
    """
    torch.set_num_threads(1)


def fit_loader(workers: int, batch: int, width: int, height: int, wanted_prefetch: int = 4) -> tuple[int, int]:
    """Workers and prefetch depth that fit in /dev/shm, where worker batches wait for the trainer.

    Why: containers often mount a 64 MB /dev/shm, and DataLoader then dies with a bus error instead
    of a message. Each batch is about 7 bytes a pixel (colour, int16 depth, packed masks).
    """
    if workers == 0:
        return 0, 0
    per_batch = batch * width * height * 7
    try:
        free = shutil.disk_usage("/dev/shm").free // 2
    except OSError:
        return workers, wanted_prefetch
    prefetch = max(1, min(wanted_prefetch, free // max(1, per_batch * workers)))
    fit_workers = max(1, min(workers, free // max(1, per_batch * prefetch)))
    if fit_workers < workers:
        print(f"warning: /dev/shm has {free * 2 / 2**20:.0f} MiB free: {fit_workers} workers instead of {workers} "
              "(mount a larger /dev/shm, e.g. docker --shm-size=8g)", flush=True)
    return int(fit_workers), int(prefetch)


def to_model_inputs(batch: dict[str, Any], device: torch.device, fill: float
                    ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """What the server's engine builds (colour / 255, depth metres with holes filled), on the device."""
    color = batch["color"].to(device, non_blocking=True).float().div_(255.0)
    if "depth" in batch:
        d = batch["depth"].to(device, non_blocking=True).float().mul_(0.001)
        d = torch.where(d > 0, d, torch.full_like(d, fill))
        x = torch.cat([color, d.unsqueeze(1)], dim=1)
    else:
        x = color
    w = color.shape[-1]
    shifts = torch.arange(7, -1, -1, device=device, dtype=torch.uint8)
    targets = []
    for boxes, packed, labels in zip(batch["boxes"], batch["masks"], batch["labels"]):
        p = packed.to(device, non_blocking=True)
        masks = ((p.unsqueeze(-1) >> shifts) & 1).reshape(p.shape[0], p.shape[1], -1)[..., :w]
        targets.append({"boxes": boxes.to(device, non_blocking=True), "labels": labels.to(device, non_blocking=True),
                        "masks": masks})
    return list(x.unbind(0)), targets


# ----------------------------------------------------------------------------- model


def input_norm(kind: str) -> tuple[list[float], list[float]]:
    mean, std = list(PIXEL_MEAN), list(PIXEL_STD)
    if kind == "rgbd":
        mean.append(DEPTH_MEAN)
        std.append(DEPTH_STD)
    return mean, std


def folder_extra(kind: str) -> dict[str, Any]:
    """node_config.json keys that pin the normalisation the weights were trained with."""
    extra: dict[str, Any] = {"PIXEL_MEAN": list(PIXEL_MEAN), "PIXEL_STD": list(PIXEL_STD)}
    if kind == "rgbd":
        extra.update(DEPTH_MEAN=DEPTH_MEAN, DEPTH_STD=DEPTH_STD, DEPTH_FILL=DEPTH_FILL)
    return extra


def tune_backbone(model: nn.Module, dtype: torch.dtype | None, channels_last: bool, benchmark: bool) -> None:
    """Mixed precision, channels-last and cuDNN autotuning for the backbone and FPN only.

    Why only there: they hold most of the FLOPs and see one input shape per batch, while the mask
    head's batch is the number of positive RoIs, new every step: global cudnn.benchmark re-tunes it
    every iteration (measured on an H100: 0.9 it/s and a 58 s first step). The heads stay in fp32
    because torchvision decodes box deltas in the predictions' dtype: in bf16 proposals would be off
    by pixels (8-bit mantissa at 500 px), and fp16 would need a GradScaler. Patching the instance's
    forward keeps the state-dict keys unchanged.
    """
    backbone = model.backbone
    inner = backbone.forward

    def forward(x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = benchmark
        try:
            if dtype is None:
                feats = inner(x)
            else:
                with torch.autocast(device_type=x.device.type, dtype=dtype):
                    feats = inner(x)
        finally:
            torch.backends.cudnn.benchmark = previous
        return OrderedDict((k, v.float().contiguous()) for k, v in feats.items())

    backbone.forward = forward  # type: ignore[method-assign]
    if channels_last:
        backbone.to(memory_format=torch.channels_last)


def live_batchnorm(module: nn.Module, zero_init_residual: bool = False) -> int:
    """Replaces every FrozenBatchNorm2d under `module` by a trainable BatchNorm2d holding the same numbers.

    Why: dd.models builds ResNet backbones with frozen BN, as torchvision does for fine-tuning a pretrained
    net; from scratch (nothing can be downloaded) frozen BN is the identity and a 50-layer ResNet without
    normalisation does not train in minutes. The state-dict keys are the same (BatchNorm2d only adds
    num_batches_tracked, dropped when writing), so the folder loads into the served, frozen-BN model.
    zero_init_residual: each bottleneck's last BN starts at scale 0, so every residual block starts as the
    identity (Goyal et al., 2017): the usual way to make a deep ResNet trainable from scratch at a high LR.
    Returns how many layers were replaced.
    """
    from torchvision.models.resnet import Bottleneck, BasicBlock
    from torchvision.ops.misc import FrozenBatchNorm2d

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBatchNorm2d):
                bn = nn.BatchNorm2d(child.weight.numel(), eps=child.eps, momentum=0.01).to(child.weight.device)
                with torch.no_grad():
                    bn.weight.copy_(child.weight)
                    bn.bias.copy_(child.bias)
                    bn.running_mean.copy_(child.running_mean)
                    bn.running_var.copy_(child.running_var)
                setattr(parent, name, bn)
                replaced += 1
    if zero_init_residual:
        for m in module.modules():
            last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
            if isinstance(last, nn.BatchNorm2d):
                nn.init.zeros_(last.weight)
    return replaced


def served_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as the server's model has them: fp32 on the CPU, without BatchNorm's step counters."""
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms and biases: decaying them only fights the normalisation."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(progress: float, it: int, warmup: int, floor: float = 0.01) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `floor` over progress 0..1."""
    warm = min(1.0, (it + 1) / max(1, warmup))
    progress = min(max(progress, 0.0), 1.0)
    return warm * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- evaluation (no pycocotools)


def load_served(folder: Path, device: torch.device, score_threshold: float | None = None
                ) -> tuple[nn.Module, Any]:
    """The model as the server's torchvision engine builds it from the folder (fp16 weights, upcast)."""
    cfg = load_model_config(folder)
    mean, std = list(cfg.pixel_mean), list(cfg.pixel_std)
    if cfg.input_kind == "rgbd":
        mean.append(cfg.depth_mean_m)
        std.append(cfg.depth_std_m)
    thr = cfg.score_threshold if score_threshold is None else score_threshold
    model = build_maskrcnn(cfg.architecture, cfg.num_classes, cfg.channels, cfg.min_size, cfg.max_size, mean, std, thr)
    missing, unexpected = model.load_state_dict(load_state_dict(cfg.weights), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{folder}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().to(device), cfg


def served_input(color: np.ndarray, depth: np.ndarray | None, cfg: Any, device: torch.device) -> torch.Tensor:
    """Mirror of TorchvisionMaskRCNN._tensor: the one place where train and serve must agree."""
    x = torch.from_numpy(color).to(device).permute(2, 0, 1).float().div_(255.0)
    if cfg.input_kind != "rgbd":
        return x
    d = torch.from_numpy(depth.astype(np.float32) * np.float32(0.001)).to(device)
    fill = cfg.depth_fill_m if cfg.depth_fill_m is not None else cfg.depth_mean_m
    d = torch.where(d > 0, d, torch.full_like(d, fill))
    return torch.cat([x, d.unsqueeze(0)], dim=0)


@torch.no_grad()
def precise_bn(folder: Path, device: torch.device, seeds: list[int], width: int, height: int, batch: int = 16) -> None:
    """Re-estimates BatchNorm statistics of the written model on as-served inputs, and rewrites it.

    Why: the MobileNet backbone is trained from scratch, so its BN layers are live; the running
    averages collected during training (momentum 0.01, weights moving, training-time inputs) are off
    by a few percent per layer, and through ~50 layers that compounds: a model that scores cartons
    at 0.99 with batch statistics found nothing at all with its running ones (H100 run, 486 steps).
    Averaging exact batch statistics of the final fp16-rounded weights, in fp32, on unaugmented
    scenes at the served size fixes it for a few seconds of compute. A ResNet backbone is served with
    frozen BN: it is made live again here (live_batchnorm) for the estimate, then written back frozen.
    """
    model, cfg = load_served(folder, device, 0.5)
    live_batchnorm(model.backbone)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not seeds:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
        bn.train()
    for i in range(0, len(seeds), batch):
        scenes = [generate_scene(s, width, height) for s in seeds[i:i + batch]]
        images, _ = model.transform([served_input(sc.color, sc.depth, cfg, device) for sc in scenes])
        model.backbone(images.tensors)
    state = served_state(model)
    torch.save({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()},
               folder / cfg.weights.name)


def coco_ap(scores: np.ndarray, matched: np.ndarray, n_gt: int) -> float:
    """COCO's 101-point interpolated average precision for one IoU threshold and one category."""
    if n_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(matched[order])
    fp = np.cumsum(~matched[order])
    recall = tp / n_gt
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def _greedy_match(iou: np.ndarray, thr: float) -> np.ndarray:
    """COCOeval's matching: detections in score order take the best still-free GT with IoU >= thr."""
    n_det, n_gt = iou.shape
    taken = np.zeros(n_gt, bool)
    out = np.zeros(n_det, bool)
    for i in range(n_det):
        best, best_j = min(thr, 1 - 1e-10), -1
        for j in range(n_gt):
            if not taken[j] and iou[i, j] >= best:
                best, best_j = iou[i, j], j
        if best_j >= 0:
            taken[best_j] = True
            out[i] = True
    return out


@torch.inference_mode()
def quick_eval(folder: Path, device: torch.device, count: int, first_seed: int, width: int, height: int,
               score_threshold: float = 0.05) -> dict[str, float]:
    """Mask/box AP of the written folder on held-out scenes, COCO's rules re-implemented.

    The GPU training box has no pycocotools; this gives the training report a number to trust
    (it matches COCOeval for one category, no crowd regions, maxDets 100: on 20 scenes it agreed with
    eval_demo.py --send raw through a server to the third decimal). The reference number is
    scripts/eval_demo.py's, through a running server.
    """
    model, cfg = load_served(folder, device, score_threshold)
    thresholds = np.linspace(0.5, 0.95, 10)
    per_kind: dict[str, list[list[tuple[np.ndarray, np.ndarray]]]] = {"mask": [], "box": []}
    n_gt = 0
    for k in range(count):
        sc = generate_scene(first_seed + k, width, height)
        out = model([served_input(sc.color, sc.depth, cfg, device)])[0]
        scores = out["scores"].float().cpu().numpy()
        order = np.argsort(-scores, kind="mergesort")[:100]
        scores = scores[order]
        n_gt += len(sc.masks)
        gt_m = torch.from_numpy(sc.masks).to(device).flatten(1).float()
        dt_m = (out["masks"][order, 0] >= cfg.mask_threshold).flatten(1).float()
        inter = dt_m @ gt_m.T
        union = dt_m.sum(1, keepdim=True) + gt_m.sum(1)[None] - inter
        miou = (inter / union.clamp(min=1)).cpu().numpy()
        biou = torchvision.ops.box_iou(out["boxes"][order].float(),
                                       torch.from_numpy(sc.boxes).to(device)).cpu().numpy()
        for kind, iou in (("mask", miou), ("box", biou)):
            per_kind[kind].append([(scores, _greedy_match(iou, t)) for t in thresholds])
    res: dict[str, float] = {}
    for kind, images in per_kind.items():
        aps = []
        for ti in range(len(thresholds)):
            s = np.concatenate([img[ti][0] for img in images]) if images else np.zeros(0)
            m = np.concatenate([img[ti][1] for img in images]) if images else np.zeros(0, bool)
            aps.append(coco_ap(s, m, n_gt))
        res[f"{kind}_AP"] = float(np.mean(aps))
        res[f"{kind}_AP50"] = aps[0]
        res[f"{kind}_AP75"] = aps[5]
    res["scenes"] = count
    res["first_seed"] = first_seed
    res["score_threshold"] = score_threshold
    return res


def cpu_latency(folder: Path, runs: int = 7, first_seed: int = EVAL_SEED_BASE) -> dict[str, float]:
    """Median time of one 640x480 image on ONE CPU core, at the folder's MIN_SIZE and threshold.

    Measured on held-out scenes with the trained weights, because the mask head's cost grows with the
    number of detections: random weights would say nothing.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = torch.device("cpu")
        model, cfg = load_served(folder, cpu)
        scenes = [generate_scene(first_seed + k, 640, 480) for k in range(3)]
        times, dets = [], []
        with torch.inference_mode():
            for sc in scenes:  # warm-up
                model([served_input(sc.color, sc.depth, cfg, cpu)])
            for r in range(runs):
                sc = scenes[r % len(scenes)]
                t = time.perf_counter()
                out = model([served_input(sc.color, sc.depth, cfg, cpu)])[0]
                _ = (out["masks"][:, 0] >= cfg.mask_threshold).numpy()
                times.append(time.perf_counter() - t)
                dets.append(len(out["scores"]))
        return {"median_ms": 1000 * float(np.median(times)), "min_ms": 1000 * float(np.min(times)),
                "runs": runs, "mean_detections": float(np.mean(dets)), "min_size": cfg.min_size, "cpu": cpu_model()}
    finally:
        torch.set_num_threads(threads)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_latency_fresh_process(folder: Path) -> dict[str, Any] | None:
    """cpu_latency in a new interpreter, like a server worker: no CUDA context, no thread pools left
    over from training, no data workers still winding down."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure-latency", str(folder)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        print(f"warning: CPU latency measurement failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kind", choices=("rgbd", "rgb"), default="rgbd", help="RGB-D (4 channels) or RGB model")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="demo",
                   help="demo: the shipped MobileNetV3 CPU model; r50: R50-FPN (torchvision's maskrcnn_resnet50_fpn "
                        "shape, live BatchNorm while training), for checking the fast GPU engine (issue #18)")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (node_config.json, model.pth, ...)")
    p.add_argument("--iters", type=int, default=1100,
                   help="training steps (ignored with --minutes); ~4.2 steps/s of 16 scenes on an H100")
    p.add_argument("--minutes", type=float, default=None,
                   help="train for this wall-clock budget instead of --iters; the LR schedule follows the clock")
    p.add_argument("--batch", type=int, default=16, help="scenes per step")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 AdamW, 0.04 SGD)")
    p.add_argument("--weight-decay", type=float, default=None, help="(default: 0.05 AdamW, 4e-5 SGD)")
    p.add_argument("--warmup", type=int, default=150, help="linear warm-up steps")
    p.add_argument("--clip", type=float, default=10.0, help="gradient-norm clip (0: off)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--seed", type=int, default=0, help="model init and first training scene seed")
    # Off by default: measured on an H100 (batch 16, 640x480) the step is bound by torchvision's
    # per-image Python work, not by the GPU: 4.2 it/s with or without them, and autotuning the
    # backbone costs ~20 s of start-up. Kept as switches for bigger backbones.
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for backbone+FPN (heads stay fp32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels-last backbone")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False,
                   help="cuDNN autotuning of the backbone's convolutions (never of the heads)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="data-generating processes (each makes ~30 scenes/s; an H100 step takes ~70/s)")
    p.add_argument("--min-size", type=int, default=384,
                   help="MIN_SIZE: shorter side the model sees (384: ~115 ms on one core; 416: ~150 ms)")
    p.add_argument("--max-size", type=int, default=None, help="MAX_SIZE (default: fits a 4:3 image at MIN_SIZE)")
    p.add_argument("--scale-jitter", type=float, default=0.0,
                   help="train each step at MIN_SIZE x U(1-j, 1+j) (one size per batch), 0: off")
    p.add_argument("--width", type=int, default=640, help="generated scene width")
    p.add_argument("--height", type=int, default=480, help="generated scene height")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train on the scenes as generated")
    p.add_argument("--score-thresh", type=float, default=0.5, help="SCORE_THRESH_TEST written to node_config.json")
    p.add_argument("--bn-scenes", type=int, default=128,
                   help="scenes to re-estimate BatchNorm statistics on after training (precise BN)")
    p.add_argument("--val-count", type=int, default=100, help="held-out scenes for the final quick AP (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the training process (0: torch's default)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--no-latency", dest="latency", action="store_false",
                   help="skip the one-core CPU timing (always skipped with --arch r50: not a CPU model)")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = (1e-3 if args.arch == "r50" else 2e-3) if args.optimizer == "adamw" else 0.04
    if args.arch != "demo":
        args.latency = False
    if args.weight_decay is None:
        args.weight_decay = 0.05 if args.optimizer == "adamw" else 4e-5
    if args.max_size is None:
        args.max_size = int(math.ceil(args.min_size * 4 / 3))
    if not 0 <= args.seed < EVAL_SEED_BASE:
        p.error(f"--seed must be in [0, {EVAL_SEED_BASE}) (seeds from {EVAL_SEED_BASE} are held out)")
    return args


def script_path() -> str:
    """This script as the command line should name it: relative to the repository when inside it."""
    here = Path(__file__).resolve()
    try:
        return str(here.relative_to(REPO))
    except ValueError:
        return str(here)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_readme(folder: Path, info: dict[str, Any]) -> None:
    """A human note in the folder, so whoever finds the weights knows how to remake them."""
    q = info.get("quick_eval") or {}
    lat = info.get("cpu_latency") or {}
    lines = [
        f"{'Demo' if info.get('arch', 'demo') == 'demo' else info['architecture']['backbone']} "
        f"{info['kind'].upper()} Mask R-CNN (one category: carton), trained from scratch on scenes generated by",
        "dd.synth (no downloaded weights or data). Remake it with:",
        "",
        f"    {info['command']}",
        "",
        f"Trained {info['iterations']} steps x {info['settings']['batch']} scenes (seeds {info['train_seeds'][0]}.."
        f"{info['train_seeds'][1] - 1}) on {info['device_name']} in {info['train_seconds']:.0f} s, "
        f"torch {info['versions']['torch']}.",
    ]
    if q:
        lines.append(f"Quick check on {q['scenes']} held-out scenes (seeds {q['first_seed']}+, in-process): "
                     f"mask AP {q['mask_AP']:.3f}, AP50 {q['mask_AP50']:.3f}; box AP {q['box_AP']:.3f}.")
    if lat:
        lines.append(f"One CPU core, 640x480: {lat['median_ms']:.0f} ms median ({lat['cpu']}).")
    lines += ["The reference numbers come from scripts/eval_demo.py through a running server.",
              "Everything else (settings, losses, versions) is in train_info.json."]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    cv2.setNumThreads(1)  # inherited by the data workers; see _worker_init
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny gradients otherwise slow CPU kernels down many times over
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # on for the backbone only: see tune_backbone
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    channels = 4 if args.kind == "rgbd" else 3
    mean, std = input_norm(args.kind)
    arch = dict(ARCHITECTURES[args.arch])
    model = build_maskrcnn(arch, len(CATEGORIES) + 1, channels, args.min_size, args.max_size, mean, std)
    if arch["backbone"].startswith("resnet"):
        live_batchnorm(model.backbone, zero_init_residual=True)
    # Training-only knobs (not part of the weights): the test-time proposal count, for speed.
    model.rpn._pre_nms_top_n["training"] = 1000
    model.rpn._post_nms_top_n["training"] = 1000
    model.to(device)
    if args.amp or args.channels_last or args.cudnn_benchmark:
        tune_backbone(model, torch.bfloat16 if args.amp else None, args.channels_last, args.cudnn_benchmark)
    n_params = sum(p.numel() for p in model.parameters())
    if args.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                                       betas=(0.9, 0.999), fused=device.type == "cuda")
    else:
        opt = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True)

    data = SceneBatches(args.seed, args.batch, args.kind, args.width, args.height, args.augment)
    args.workers, prefetch = fit_loader(args.workers, args.batch, args.width, args.height)
    loader = DataLoader(data, batch_size=None, num_workers=args.workers, pin_memory=device.type == "cuda",
                        worker_init_fn=_worker_init if args.workers else None,
                        prefetch_factor=prefetch if args.workers else None, persistent_workers=False)
    budget_s = args.minutes * 60.0 if args.minutes else None
    print(f"training {args.kind} Mask R-CNN ({n_params / 1e6:.2f} M parameters, {arch['backbone']}, FPN "
          f"{arch['fpn_channels']}) on {device}, batch {args.batch}, "
          + (f"{args.minutes} min budget" if budget_s else f"{args.iters} steps")
          + f", {args.optimizer} lr {args.lr:g}, amp {args.amp}, channels_last {args.channels_last}, "
          f"{args.workers} workers", flush=True)

    stop = {"flag": False}

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"signal {signum}: finishing the step, then writing the model", flush=True)
        stop["flag"] = True

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    model.train()
    rng = np.random.default_rng([args.seed, 0x5CA1E])
    it = 0
    sums: dict[str, torch.Tensor] = {}
    history: list[dict[str, float]] = []
    data_wait = 0.0
    t_loop = time.time()
    t_log, it_log = t_loop, 0
    loader_iter = iter(loader)
    lr = 0.0
    try:
        while not stop["flag"]:
            elapsed = time.time() - t_loop
            if budget_s is not None:
                if elapsed >= budget_s:
                    break
                progress = elapsed / budget_s
            else:
                if it >= args.iters:
                    break
                progress = it / max(1, args.iters)
            t_wait = time.time()
            batch = next(loader_iter)
            data_wait += time.time() - t_wait
            images, targets = to_model_inputs(batch, device, DEPTH_FILL)
            if args.scale_jitter > 0:
                s = args.min_size * rng.uniform(1 - args.scale_jitter, 1 + args.scale_jitter)
                model.transform.min_size = (int(round(s / 32) * 32),)
                model.transform.max_size = int(math.ceil(model.transform.min_size[0] * 4 / 3))
            lr = args.lr * lr_factor(progress, it, args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            losses = model(images, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            it += 1
            if it % args.log_every == 0 or it == 1:
                n = it - it_log if it > 1 else 1
                vals = {k: float(v) / n for k, v in sums.items()}
                sums.clear()
                total = sum(vals.values())
                if not math.isfinite(total):
                    raise FloatingPointError(f"loss is {total} at step {it}; lower --lr or raise --warmup")
                now = time.time()
                rate = n / max(now - t_log, 1e-9)
                wait_pct = 100.0 * data_wait / max(now - t_log, 1e-9)
                rec = {"iter": it, "loss": total, **vals, "lr": lr, "it_per_s": rate, "elapsed_s": now - t_loop}
                history.append(rec)
                short = " ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in vals.items())
                goal = f"{budget_s:.0f}s" if budget_s else f"{args.iters}"
                print(f"it {it:5d} [{(now - t_loop):5.0f}s/{goal}] loss {total:.3f} ({short}) lr {lr:.2e} "
                      f"{rate:.2f} it/s {rate * args.batch:.0f} img/s data-wait {wait_pct:.0f}%", flush=True)
                t_log, it_log, data_wait = now, it, 0.0
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        del loader_iter  # stops the workers before the evaluation and the CPU timing
    train_s = time.time() - t_loop
    if it == 0:
        print("no training step ran; nothing written", file=sys.stderr)
        return 1
    print(f"trained {it} steps in {train_s:.0f} s ({it / train_s:.2f} it/s)", flush=True)

    state = served_state(model)
    write_model_folder(args.out, state, input_kind=args.kind, categories=list(CATEGORIES), architecture=arch,
                       min_size=args.min_size, max_size=args.max_size, score_threshold=args.score_thresh,
                       half=True, extra=folder_extra(args.kind))
    bn_seeds = list(range(args.seed + it * args.batch, args.seed + it * args.batch + args.bn_scenes))
    if args.bn_scenes > 0:
        print(f"re-estimating BatchNorm statistics on {args.bn_scenes} scenes ...", flush=True)
        precise_bn(args.out, device, bn_seeds, args.width, args.height, args.batch)
    weights_bytes = (args.out / "model.pth").stat().st_size
    final = {k: v for k, v in history[-1].items() if k.startswith("loss")} if history else {}

    quick = None
    if args.val_count > 0:
        print(f"quick evaluation on {args.val_count} held-out scenes (seeds {EVAL_SEED_BASE}+) ...", flush=True)
        quick = quick_eval(args.out, device, args.val_count, EVAL_SEED_BASE, args.width, args.height)
    latency = cpu_latency_fresh_process(args.out) if args.latency else None

    info: dict[str, Any] = {
        "command": shlex.join(["python", script_path(), *(sys.argv[1:] if argv is None else argv)]),
        "kind": args.kind,
        "arch": args.arch,
        "seed": args.seed,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "architecture": arch,
        "normalisation": {"pixel_mean": list(PIXEL_MEAN), "pixel_std": list(PIXEL_STD),
                          **({"depth_mean_m": DEPTH_MEAN, "depth_std_m": DEPTH_STD, "depth_fill_m": DEPTH_FILL}
                             if args.kind == "rgbd" else {})},
        "train_seeds": [args.seed, args.seed + it * args.batch],
        "precise_bn_seeds": [bn_seeds[0], bn_seeds[-1] + 1] if bn_seeds else None,
        "eval_seed_base": EVAL_SEED_BASE,
        "iterations": it,
        "train_seconds": train_s,
        "wall_seconds": time.time() - t_start,
        "it_per_s": it / train_s,
        "final_losses": final,
        "final_lr": lr,
        "loss_history": history,
        "weights_bytes": weights_bytes,
        "parameters": n_params,
        "quick_eval": quick,
        "cpu_latency": latency,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
        "git_commit": git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    write_readme(args.out, info)

    print("\n== report ==")
    print(f"model folder     {args.out}")
    print(f"steps            {it} x {args.batch} scenes in {train_s:.0f} s ({it / train_s:.2f} it/s), "
          f"wall {info['wall_seconds']:.0f} s")
    print("final losses     " + " ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in final.items()))
    ok_size = weights_bytes <= MAX_WEIGHTS_BYTES or args.arch != "demo"  # the bound is the shipped demo's
    print(f"weights          {weights_bytes / 1e6:.2f} MB fp16"
          + (f" (bound 15 MB: {'ok' if ok_size else 'OVER'})" if args.arch == "demo" else ""))
    if quick:
        print(f"held-out quick   mask AP {quick['mask_AP']:.3f} AP50 {quick['mask_AP50']:.3f} "
              f"AP75 {quick['mask_AP75']:.3f} | box AP {quick['box_AP']:.3f} AP50 {quick['box_AP50']:.3f} "
              f"({quick['scenes']} scenes)")
    ok_lat = True
    if latency:
        ok_lat = latency["median_ms"] <= LATENCY_BOUND_MS
        print(f"1 CPU core       {latency['median_ms']:.0f} ms median per 640x480 at MIN_SIZE {latency['min_size']} "
              f"({latency['mean_detections']:.0f} detections; bound {LATENCY_BOUND_MS:.0f} ms: "
              f"{'ok' if ok_lat else 'OVER'})")
    print(f"written          {args.out / 'train_info.json'}")
    return 0 if ok_size else 3


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-latency":  # internal: see cpu_latency_fresh_process
        print(json.dumps(cpu_latency(Path(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
