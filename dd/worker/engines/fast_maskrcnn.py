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
        self._pinned: dict[int, mmap.mmap] = {}
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
            ptr = ctypes.addressof(ctypes.c_char.from_buffer(base))
            err = torch.cuda.cudart().cudaHostRegister(ptr, len(base), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister returned {err}")
            self._pinned[id(base)] = base
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
        # RPN proposals: torchvision's own filtering (top-k per level, NMS), in fp32.
        rpn = model.rpn
        num_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        obj, dl = concat_box_prediction_layers([o.float() for o in objectness], [d.float() for d in deltas])
        proposals = rpn.box_coder.decode(dl, anchors).view(len(items), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, obj, sizes, num_per_level)
        self._mark("proposals")
        heads = model.roi_heads
        cuda = self.dev.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda and self.fp16):
            bf = heads.box_head(heads.box_roi_pool(feats, boxes, sizes))
            class_logits, box_regression = heads.box_predictor(bf)
        det_boxes, det_scores, det_labels = heads.postprocess_detections(
            class_logits.float(), box_regression.float(), boxes, sizes)
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
        for base in self._pinned.values():
            try:
                torch.cuda.cudart().cudaHostUnregister(ctypes.addressof(ctypes.c_char.from_buffer(base)))
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        self._pinned.clear()
        self._graphs.clear()
        del self.model
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
