"""A detectron2 Mask R-CNN, eager mode, as detectron2's DefaultPredictor runs it: the reference for these models.

Chosen instead of the torchvision engine when a model folder's weights are
detectron2's (dd.config sets ModelConfig.detectron2). Each image is resized,
normalised and padded as DefaultPredictor does (dd.models.detectron2.preprocess),
run through the torchvision-structured network with detectron2's rules
(dd.models.detectron2.network), and its detections are brought back to the input
image and their masks pasted as detector_postprocess does
(dd.models.detectron2.postprocess). A batch is run in groups of images of one
size, so that each image is padded exactly as when detectron2 runs it alone.
Instances are kept when their score is above (>) the threshold, as in detectron2.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torchvision.models.detection.image_list import ImageList

from dd.models.detectron2.loader import load_detectron2_model
from dd.models.detectron2.postprocess import paste_masks, rescale_boxes
from dd.models.detectron2.preprocess import network_image, normalise_and_pad, resized_size
from dd.worker.engines.base import Detections, Engine, EngineInput

log = logging.getLogger(__name__)


class Detectron2MaskRCNN(Engine):
    name = "detectron2"

    def load(self) -> None:
        cfg = self.config
        spec = cfg.detectron2
        if spec is None or cfg.weights is None:
            raise ValueError(f"model {cfg.name}: the detectron2 engine needs detectron2 weights and their YAML")
        self.spec = spec
        self.torch_device = torch.device(self.device)
        self.model = load_detectron2_model(spec, cfg.weights, score_threshold=cfg.score_threshold,
                                           min_size=cfg.min_size, max_size=cfg.max_size).to(self.torch_device)
        self.mean, self.std = spec.rgb_mean_std()
        h = w = cfg.min_size
        dummy = EngineInput(np.zeros((h, w, 3), np.uint8),
                            np.zeros((h, w), np.uint16) if cfg.input_kind == "rgbd" else None, 1.0)
        self.infer([dummy])

    def _image(self, item: EngineInput) -> torch.Tensor:
        cfg = self.config
        if cfg.input_kind == "rgbd":
            if item.depth is None:
                raise ValueError("RGB-D model needs depth")
            return network_image(item.color, item.depth, cfg.min_size, cfg.max_size, depth_unit_m=cfg.depth_unit_m,
                                 depth_fill_m=cfg.depth_fill_m)
        return network_image(item.color, None, cfg.min_size, cfg.max_size)

    @torch.inference_mode()
    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        results: list[Detections | None] = [None] * len(batch)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(tuple(item.color.shape[:2]), []).append(i)
        for (h, w), idx in groups.items():
            for i, det in zip(idx, self._infer_same_size([batch[i] for i in idx], h, w, want_masks)):
                results[i] = det
        return results  # type: ignore[return-value]

    def _infer_same_size(self, items: list[EngineInput], h: int, w: int, want_masks: bool) -> list[Detections]:
        model, cfg = self.model, self.config
        rh, rw = resized_size(h, w, cfg.min_size, cfg.max_size)
        x = normalise_and_pad([self._image(it) for it in items], self.mean, self.std, device=self.torch_device)
        sizes = [(rh, rw)] * len(items)
        feats = model.backbone(x)
        proposals, _ = model.rpn(ImageList(x, sizes), feats)
        # One pass at the lowest threshold asked; each image keeps its own below (NMS is greedy by score,
        # so what survives above a higher threshold is the same).
        model.roi_heads.score_thresh = min(it.score_threshold for it in items)
        heads = model.roi_heads
        if not want_masks:
            saved, heads.mask_roi_pool = heads.mask_roi_pool, None
        try:
            outputs, _ = heads(feats, proposals, sizes)
        finally:
            if not want_masks:
                heads.mask_roi_pool = saved
        out = []
        for item, det in zip(items, outputs):
            boxes, keep = rescale_boxes(det["boxes"], (rh, rw), (h, w))
            keep &= det["scores"] > item.score_threshold
            boxes = boxes[keep]
            masks = None
            if want_masks:
                masks = paste_masks(det["masks"][keep][:, 0], boxes, h, w, cfg.mask_threshold).cpu().numpy()
            out.append(Detections(boxes.float().cpu().numpy(), det["scores"][keep].float().cpu().numpy(),
                                  det["labels"][keep].cpu().numpy().astype(np.int64), masks))
        return out

    def close(self) -> None:
        del self.model
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
