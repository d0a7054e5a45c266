"""The fast GPU path for the same Mask R-CNN weights as the torchvision engine.

Eager torchvision spends most of its time on the host: preprocessing image by
image, hundreds of small kernels in the backbone launched one by one, and a
Python loop that pastes every instance's mask into a full-image tensor, which
pycocotools then scans pixel by pixel. Here:

- preprocessing runs on the GPU, for all images of a size at once, reading
  the shared-memory slot through a pinned (page-locked) mapping;
- backbone, FPN and RPN head run in fp16, channels-last, replayed from a CUDA
  graph captured once per (batch, padded size), so they cost one launch;
- proposal filtering and the box head reuse torchvision's modules (same
  arithmetic, few host syncs), the heads under fp16 autocast;
- the mask head runs on the final detections only, and masks are pasted and
  run-length encoded for all instances together (mask_rle), so only the change
  positions of each mask come back to the host.

Falls back to the torchvision engine (with a log line) where it cannot run: no
GPU. ENGINE_OPTIONS: fp16 (true), cuda_graphs (true), pin_memory (true),
warmup_sizes ([[H, W], ...] input sizes to capture graphs for at load),
allow_cpu (false; the CPU path exists for tests and has no graphs or fp16).
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from dd.worker.engines.base import Detections, Engine, EngineInput, EngineUnavailable
from dd.worker.engines.mask_rle import paste_and_encode
from dd.worker.engines.torchvision_maskrcnn import build_loaded_model

log = logging.getLogger(__name__)


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size torchvision's GeneralizedRCNNTransform resizes an h x w image to."""
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return int(math.floor(h * scale)), int(math.floor(w * scale))


def padded(n: int, divisible: int = 32) -> int:
    return int(math.ceil(n / divisible) * divisible)


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """NMS within each group, as one NMS call: groups are moved apart so they cannot overlap.

    torchvision's batched_nms switches to one NMS call per group above 20000
    boxes on a GPU; with 90 classes that is 90 calls and 90 host syncs.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = groups.to(boxes) * (boxes.max() + 1)
    return box_ops.nms(boxes + offsets[:, None], scores, iou)


class FastMaskRCNN(Engine):
    name = "fast"

    def load(self) -> None:
        opts: dict[str, Any] = self.config.engine_options
        self.dev = torch.device(self.device)
        cuda = self.dev.type == "cuda"
        if not cuda and not opts.get("allow_cpu", False):
            raise EngineUnavailable("the fast engine needs a CUDA GPU and this worker has none")
        self.fp16 = cuda and bool(opts.get("fp16", True))
        self.use_graphs = cuda and bool(opts.get("cuda_graphs", True))
        self.pin = cuda and bool(opts.get("pin_memory", True))
        # Detection candidates (box x class) kept for NMS, by score. Exact whenever the survivors
        # among them fill max_detections (checked per image; otherwise all candidates are used).
        self.pre_nms_topk = int(opts.get("pre_nms_topk", 4096))
        self.model = build_loaded_model(self.config).eval().to(self.dev)
        if cuda:
            torch.backends.cudnn.benchmark = True
            self.model.backbone.to(memory_format=torch.channels_last)
        if self.fp16:
            self.model.backbone.half()
            self.model.rpn.head.half()
        self.dtype = torch.float16 if self.fp16 else torch.float32
        cfg = self.config
        mean, std = list(cfg.pixel_mean), list(cfg.pixel_std)
        if cfg.input_kind == "rgbd":
            mean.append(cfg.depth_mean_m)
            std.append(cfg.depth_std_m)
        self.mean = torch.tensor(mean, device=self.dev).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.dev).view(1, -1, 1, 1)
        self.fill = cfg.depth_fill_m if cfg.depth_fill_m is not None else cfg.depth_mean_m
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]] = {}
        self._anchors: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._pinned: dict[int, tuple[mmap.mmap, ctypes.c_char]] = {}
        # Set to a dict to collect per-stage wall times (synchronising between stages): benchmarks only.
        self.stage_times: dict[str, list[float]] | None = None
        self._t_last = 0.0
        sizes = opts.get("warmup_sizes") or [[cfg.min_size, cfg.min_size]]
        for h, w in sizes:
            for b in sorted({1, cfg.max_batch_size}):
                dummy = [EngineInput(np.zeros((h, w, 3), np.uint8),
                                     np.zeros((h, w), np.uint16) if cfg.input_kind == "rgbd" else None, 1.0)] * b
                self.infer(dummy)

    # -- host memory ----------------------------------------------------------------------
    def _pin_source(self, arr: np.ndarray) -> None:
        """Page-locks the shared-memory mapping an input lives in, once, so copies to the GPU are DMA."""
        if not self.pin:
            return
        base = arr.base
        while isinstance(base, np.ndarray):
            base = base.base
        if not isinstance(base, mmap.mmap) or id(base) in self._pinned:
            return
        try:
            # The ctypes view exports the mapping's buffer, so the worker cannot unmap a ring while
            # it is registered (ShmRing.close then leaves the map to the last view). A dead
            # frontend's ring thus stays mapped in this worker: one ring of memory per frontend
            # restart, until the worker restarts. (An unregister hook is the better fix.)
            view = ctypes.c_char.from_buffer(base)
            err = torch.cuda.cudart().cudaHostRegister(ctypes.addressof(view), len(base), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister returned {err}")
            self._pinned[id(base)] = (base, view)
        except Exception as exc:  # noqa: BLE001 - pinning is an optimisation; never fail a request for it
            log.warning("cannot pin shared memory for faster copies: %s", exc)
            self.pin = False

    # -- stages -----------------------------------------------------------------------------
    def _mark(self, stage: str | None) -> None:
        if self.stage_times is None:
            return
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if stage is not None:
            self.stage_times.setdefault(stage, []).append((now - self._t_last) * 1e3)
        self._t_last = now

    def _preprocess(self, items: list[EngineInput], rh: int, rw: int) -> torch.Tensor:
        colors = []
        for it in items:
            self._pin_source(it.color)
            colors.append(torch.from_numpy(it.color).to(self.dev, non_blocking=True))
        x = torch.stack(colors).permute(0, 3, 1, 2).float().div_(255.0)  # B x 3 x H x W
        if self.config.input_kind == "rgbd":
            depths = []
            for it in items:
                if it.depth is None:
                    raise ValueError("RGB-D model needs depth")
                self._pin_source(it.depth)
                d = torch.from_numpy(it.depth).to(self.dev, non_blocking=True)
                depths.append(d.float() * 0.001 if it.depth.dtype == np.uint16 else d.float())
            d = torch.stack(depths)[:, None]
            d = torch.where(d > 0, d, torch.full_like(d, self.fill))
            x = torch.cat([x, d], dim=1)
        x = (x - self.mean) / self.std
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False)
        out = torch.zeros(x.shape[0], x.shape[1], padded(rh), padded(rw), device=self.dev, dtype=self.dtype)
        out[:, :, :rh, :rw] = x
        return out.contiguous(memory_format=torch.channels_last) if self.dev.type == "cuda" else out

    def _trunk(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        feats = self.model.backbone(x)
        objectness, deltas = self.model.rpn.head(list(feats.values()))
        return feats, objectness, deltas

    def _trunk_graphed(self, x: torch.Tensor):
        if not self.use_graphs:
            return self._trunk(x)
        key = tuple(x.shape)
        entry = self._graphs.get(key)
        if entry is None:
            static_x = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._trunk(static_x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._trunk(static_x)
            entry = (graph, static_x, static_out)
            self._graphs[key] = entry
            log.info("captured a CUDA graph for input %s", key)
        graph, static_x, static_out = entry
        static_x.copy_(x)
        graph.replay()
        return static_out

    def _anchors_for(self, images: ImageList, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        key = tuple(images.tensors.shape) + tuple(images.image_sizes[0])
        if key not in self._anchors:
            self._anchors[key] = self.model.rpn.anchor_generator(images, feats)
        return self._anchors[key]

    def _proposals(self, objectness: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                   n_images: int, rh: int, rw: int) -> list[torch.Tensor]:
        """torchvision's RPN filtering (top-k per level, clip, drop tiny boxes, NMS per level, top-k),
        for the whole batch at once: one NMS call and one host sync instead of several per image."""
        rpn = self.model.rpn
        num_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        obj, dl = concat_box_prediction_layers(objectness, deltas)
        boxes = rpn.box_coder.decode(dl, anchors).view(n_images, -1, 4)
        obj = obj.view(n_images, -1)
        tops, levels, start = [], [], 0
        for level, n in enumerate(num_per_level):
            k = min(rpn.pre_nms_top_n(), n)
            tops.append(obj[:, start:start + n].topk(k, dim=1).indices + start)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=obj.device))
            start += n
        top = torch.cat(tops, dim=1)  # B x K
        lvl = torch.cat(levels)
        k_all = top.shape[1]
        scores = obj.gather(1, top).sigmoid()
        cand = boxes.gather(1, top[..., None].expand(-1, -1, 4))
        cand[..., 0::2] = cand[..., 0::2].clamp(0, rw)
        cand[..., 1::2] = cand[..., 1::2].clamp(0, rh)
        wh = cand[..., 2:] - cand[..., :2]
        valid = (wh >= rpn.min_size).all(dim=-1) & (scores >= rpn.score_thresh)
        # Invalid candidates sort last and can only suppress each other, so they are removed after NMS.
        scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
        image = torch.arange(n_images, device=obj.device)[:, None].expand(-1, k_all)
        groups = (image * len(num_per_level) + lvl[None, :]).reshape(-1)
        keep = grouped_nms(cand.reshape(-1, 4), scores.reshape(-1), groups, rpn.nms_thresh)
        keep = keep[scores.reshape(-1)[keep] >= 0]
        # keep is in descending score over all images; a stable sort by image keeps that order within each.
        img_of = keep // k_all
        order = torch.sort(img_of, stable=True).indices
        keep, img_of = keep[order], img_of[order]
        counts = torch.bincount(img_of, minlength=n_images).tolist()
        flat = cand.reshape(-1, 4)
        return [b[: rpn.post_nms_top_n()] for b in flat[keep].split(counts)]

    def _detections(self, class_logits: torch.Tensor, box_regression: torch.Tensor, proposals: list[torch.Tensor],
                    rh: int, rw: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """torchvision's detection post-processing with the class-wise NMS done as one call.

        Only the pre_nms_topk best (box, class) candidates enter NMS. Greedy NMS
        decides a box by the higher-scoring boxes of its class alone, so the
        survivors among the top-k are exactly the overall survivors above the
        k-th score; when they number max_detections or more, the answer is
        torchvision's exactly. When they do not, the image is redone with every candidate.
        """
        heads = self.model.roi_heads
        n_classes = class_logits.shape[-1]
        pred_boxes = heads.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        per_image = [p.shape[0] for p in proposals]
        out_b, out_s, out_l = [], [], []
        for boxes, scores in zip(pred_boxes.split(per_image), pred_scores.split(per_image)):
            boxes = box_ops.clip_boxes_to_image(boxes, (rh, rw))[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, n_classes, device=boxes.device).repeat(scores.shape[0])
            scores = scores[:, 1:].reshape(-1)
            wh = boxes[:, 2:] - boxes[:, :2]
            valid = (scores > heads.score_thresh) & (wh >= 1e-2).all(dim=1)
            masked = torch.where(valid, scores, torch.full_like(scores, -1.0))
            k = min(self.pre_nms_topk, masked.numel())
            while True:
                top_s, top_i = masked.topk(k)
                keep = grouped_nms(boxes[top_i], top_s, labels[top_i], heads.nms_thresh)
                keep = keep[top_s[keep] > heads.score_thresh]
                if len(keep) >= heads.detections_per_img or k == masked.numel() or int(valid.sum()) <= k:
                    break
                k = masked.numel()
            keep = keep[: heads.detections_per_img]
            out_b.append(boxes[top_i][keep])
            out_s.append(top_s[keep])
            out_l.append(labels[top_i][keep])
        return out_b, out_s, out_l

    @torch.inference_mode()
    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        self.model.roi_heads.score_thresh = min(x.score_threshold for x in batch)
        results: list[Detections | None] = [None] * len(batch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(item.color.shape[:2], []).append(i)
        for (h, w), idx in groups.items():
            for i, det in zip(idx, self._infer_same_size([batch[i] for i in idx], h, w, want_masks)):
                results[i] = det
        return results  # type: ignore[return-value]

    def _infer_same_size(self, items: list[EngineInput], h: int, w: int, want_masks: bool) -> list[Detections]:
        cfg = self.config
        model = self.model
        rh, rw = resized_size(h, w, cfg.min_size, cfg.max_size)
        self._mark(None)
        x = self._preprocess(items, rh, rw)
        self._mark("preprocess")
        feats, objectness, deltas = self._trunk_graphed(x)
        self._mark("backbone+fpn+rpn head")
        sizes = [(rh, rw)] * len(items)
        images = ImageList(x, sizes)
        feat_list = list(feats.values())
        anchors = self._anchors_for(images, feat_list)
        proposals = self._proposals([o.float() for o in objectness], [d.float() for d in deltas], anchors,
                                    len(items), rh, rw)
        self._mark("proposals")
        heads = model.roi_heads
        cuda = self.dev.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda and self.fp16):
            bf = heads.box_head(heads.box_roi_pool(feats, proposals, sizes))
            class_logits, box_regression = heads.box_predictor(bf)
        det_boxes, det_scores, det_labels = self._detections(class_logits.float(), box_regression.float(),
                                                             proposals, rh, rw)
        self._mark("box head+nms")
        probs: list[torch.Tensor | None] = [None] * len(items)
        if want_masks and sum(len(b) for b in det_boxes):
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda and self.fp16):
                mf = heads.mask_head(heads.mask_roi_pool(feats, det_boxes, sizes))
                mask_logits = heads.mask_predictor(mf)
            probs = maskrcnn_inference(mask_logits.float(), det_labels)
        self._mark("mask head")
        # Back to input pixels with torchvision's arithmetic (float32 ratios of the sizes).
        ratio = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.dev) / torch.tensor(
            [rw, rh, rw, rh], dtype=torch.float32, device=self.dev)
        out = []
        for k, item in enumerate(items):
            keep = det_scores[k] >= item.score_threshold
            b = det_boxes[k][keep] * ratio
            rle = None
            if want_masks:
                p = probs[k]
                rle = (paste_and_encode(p[keep][:, 0], b, h, w, cfg.mask_threshold)
                       if p is not None and len(b) else [])
            out.append(Detections(b.cpu().numpy(), det_scores[k][keep].cpu().numpy(),
                                  det_labels[k][keep].cpu().numpy().astype(np.int64), None, rle))
        self._mark("paste+rle")
        return out

    def close(self) -> None:
        for _, view in self._pinned.values():
            try:
                torch.cuda.cudart().cudaHostUnregister(ctypes.addressof(view))
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        self._pinned.clear()
        self._graphs.clear()
        del self.model
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
