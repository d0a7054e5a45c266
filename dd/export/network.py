"""Mask R-CNN inference as one traceable function, from the normalised padded batch to the sample layout.

torchvision's and our detectron2 modules run inference with Python loops over
images, `.tolist()` and branches on data (`if not bool(keep.all())`) that a
trace would freeze at the values of the example input. This module re-states the
inference path over the same submodules (backbone, RPN head, box coder, RoI
pooling parameters, box and mask heads, predictors) in whole-batch tensor
operations with padded, fixed-size intermediates, so that one trace holds for
every input of the canvas size. Each step follows the source model's rules
(`model.semantics`): torchvision's or detectron2's RPN small-box rule and NMS
scores, FPN level rule, RoI Align alignment and sampling, small-detection removal.

The two non-standard steps (NMS over padded candidates, multi-level RoI Align)
are delegated to an ops object (dd.export.ops): standard ONNX operators for ONNX
Runtime, or TensorRT's EfficientNMS_TRT / PyramidROIAlign_TRT plugins.

Outputs are the layout of dd.models.graph_layout (TensorRT's detectron2 sample).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.image_list import ImageList

from dd.export.ops import GraphOps, LevelRule
from dd.models.semantics import Semantics

NEG = -1.0e4  # a score no candidate reaches: marks candidates that are not there


class ExportableMaskRCNN(nn.Module):
    """forward(images [B, C, H, W], image_size [B, 2] (h, w), score_threshold [1]) -> the sample layout.

    The canvas H x W is fixed at construction: the anchors are constants of it (as in NVIDIA's sample).
    """

    def __init__(self, model: MaskRCNN, channels: int, height: int, width: int, ops: GraphOps) -> None:
        super().__init__()
        self.model = model.eval()
        self.sem: Semantics = model.semantics
        self.height, self.width = height, width
        self.ops = ops
        rpn, heads = model.rpn, model.roi_heads
        self.pre_nms_topk = int(rpn._pre_nms_top_n["testing"])
        self.post_nms_topk = int(rpn._post_nms_top_n["testing"])
        self.rpn_nms = float(rpn.nms_thresh)
        self.rpn_min_size = float(rpn.min_size)
        self.box_nms = float(heads.nms_thresh)
        self.detections = int(heads.detections_per_img)
        with torch.no_grad():
            feats = model.backbone(torch.zeros(1, channels, height, width))
        self.feature_names = list(feats.keys())
        shapes = [tuple(f.shape[-2:]) for f in feats.values()]
        anchors = model.rpn.anchor_generator(ImageList(torch.zeros(1, 1, height, width), [(height, width)]),
                                             list(feats.values()))[0]
        per_loc = model.rpn.anchor_generator.num_anchors_per_location()
        self.anchors_per_level = [h * w * a for (h, w), a in zip(shapes, per_loc)]
        self.register_buffer("anchors", anchors.float(), persistent=False)
        self.box_rule = self._level_rule(model.roi_heads.box_roi_pool, feats)
        self.mask_rule = self._level_rule(model.roi_heads.mask_roi_pool, feats)

    def _level_rule(self, pool: nn.Module, feats: "OrderedDict[str, torch.Tensor]") -> LevelRule:
        """Which feature maps a pooler reads, their scales, the level rule, alignment and sampling."""
        names = list(pool.featmap_names)
        if getattr(pool, "scales", None) is not None and getattr(pool, "strides", None) is not None:
            scales = [float(s) for s in pool.scales]  # detectron2's pooler: 1 / stride
        else:  # torchvision infers each map's scale from its size: 2 ** round(log2(feature / image))
            scales = [2.0 ** round(math.log2(feats[n].shape[-2] / self.height)) for n in names]
        k_min, k_max = int(round(-math.log2(scales[0]))), int(round(-math.log2(scales[-1])))
        size = pool.output_size
        size = int(size[0]) if isinstance(size, (tuple, list)) else int(size)
        aligned = bool(getattr(pool, "aligned", False))
        return LevelRule(names, scales, k_min, k_max, size, int(pool.sampling_ratio), aligned,
                         self.sem.level_mapper)

    # -- the steps ------------------------------------------------------------------------------

    def _decode(self, coder: object, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """torchvision's BoxCoder.decode_single (detectron2's Box2BoxTransform is the same arithmetic)."""
        return coder.decode_single(deltas, boxes)  # type: ignore[attr-defined]

    @staticmethod
    def _clip(boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """boxes [B, ..., 4] clipped to each image's (h, w) in size [B, 2]."""
        shape = [size.shape[0]] + [1] * (boxes.dim() - 2)
        h = size[:, 0].reshape(shape)
        w = size[:, 1].reshape(shape)
        zero = torch.zeros_like(h)
        x1 = torch.min(torch.max(boxes[..., 0], zero), w)
        y1 = torch.min(torch.max(boxes[..., 1], zero), h)
        x2 = torch.min(torch.max(boxes[..., 2], zero), w)
        y2 = torch.min(torch.max(boxes[..., 3], zero), h)
        return torch.stack([x1, y1, x2, y2], dim=-1)

    def _big_enough(self, boxes: torch.Tensor, min_size: float, strict: bool) -> torch.Tensor:
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        if strict:  # detectron2: a side must be > min_size
            return (w > min_size) & (h > min_size)
        return (w >= min_size) & (h >= min_size)  # torchvision's remove_small_boxes

    def _proposals(self, feats: list[torch.Tensor], image_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The RPN: per-level top-k by objectness, decode, clip, drop small boxes, NMS per level, top
        post_nms_topk per image. Returns boxes [B, P, 4] and validity [B, P]."""
        b = feats[0].shape[0]
        logits, deltas = self.model.rpn.head(feats)
        obj = torch.cat([o.permute(0, 2, 3, 1).reshape(b, -1) for o in logits], dim=1)  # [B, N]
        dl = torch.cat([d.reshape(b, -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
                        for d in deltas], dim=1)  # [B, N, 4]
        sel_scores, sel_boxes, sel_levels = [], [], []
        start = 0
        for level, n in enumerate(self.anchors_per_level):
            k = min(n, self.pre_nms_topk)
            top, idx = obj[:, start:start + n].topk(k, dim=1)
            d = torch.gather(dl[:, start:start + n], 1, idx[..., None].expand(b, k, 4))
            a = self.anchors[start:start + n][idx.reshape(-1)]
            boxes = self._decode(self.model.rpn.box_coder, d.reshape(-1, 4), a).reshape(b, k, 4)
            sel_scores.append(top)
            sel_boxes.append(boxes)
            sel_levels.append(torch.full((k,), level, dtype=torch.int64))
            start += n
        logit = torch.cat(sel_scores, 1)
        boxes = self._clip(torch.cat(sel_boxes, 1), image_size)
        levels = torch.cat(sel_levels)
        strict = self.sem.name == "detectron2"
        keep = self._big_enough(boxes, self.rpn_min_size, strict)
        if not strict:  # torchvision's RPN score_thresh (0.0) on the probabilities
            keep = keep & (torch.sigmoid(logit) >= float(self.model.rpn.score_thresh))
        return self.ops.rpn_nms(boxes, logit, keep, levels, len(self.anchors_per_level), self.rpn_nms,
                                self.post_nms_topk, by_logits=strict)

    def _detections(self, feats: "OrderedDict[str, torch.Tensor]", proposals: torch.Tensor, valid: torch.Tensor,
                    image_size: torch.Tensor, score_threshold: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = self.model.roi_heads
        b, p = proposals.shape[:2]
        pooled = self.ops.roi_pool(feats, proposals, self.box_rule, (self.height, self.width))
        x = heads.box_head(pooled)
        class_logits, box_regression = heads.box_predictor(x)
        k1 = class_logits.shape[-1]
        boxes = self._decode(heads.box_coder, box_regression, proposals.reshape(-1, 4)).reshape(b * p, -1, 4)
        if boxes.shape[1] == 1:  # class-agnostic regression
            boxes = boxes.expand(b * p, k1, 4)
        boxes = self._clip(boxes.reshape(b, p, k1, 4), image_size)[:, :, 1:]  # background dropped
        scores = F.softmax(class_logits, -1).reshape(b, p, k1)[:, :, 1:]
        keep = valid[:, :, None] & torch.isfinite(scores)
        if self.sem.min_box_size > 0:
            keep = keep & self._big_enough(boxes, self.sem.min_box_size, strict=False)
        return self.ops.box_nms(boxes, scores, keep, score_threshold, self.box_nms, self.detections)

    def _masks(self, feats: "OrderedDict[str, torch.Tensor]", boxes: torch.Tensor, classes: torch.Tensor
               ) -> torch.Tensor:
        heads = self.model.roi_heads
        b, d = boxes.shape[:2]
        pooled = self.ops.roi_pool(feats, boxes, self.mask_rule, (self.height, self.width))
        logits = heads.mask_predictor(heads.mask_head(pooled))  # [B * D, K + 1 (or 1), M, M]
        m = logits.shape[-1]
        if logits.shape[1] == 1:
            own = logits[:, 0]
        else:
            index = classes.reshape(-1).long() + 1  # background is channel 0
            flat = logits.reshape(b * d * logits.shape[1], m, m)
            own = flat[torch.arange(b * d) * logits.shape[1] + index]
        return torch.sigmoid(own).reshape(b, d, m, m)

    def forward(self, images: torch.Tensor, image_size: torch.Tensor, score_threshold: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        feats = self.model.backbone(images)
        rpn_feats = list(feats.values())
        proposals, valid = self._proposals(rpn_feats, image_size)
        num, boxes, scores, classes = self._detections(feats, proposals, valid, image_size, score_threshold)
        masks = self._masks(feats, boxes, classes)
        scale = torch.tensor([self.width, self.height, self.width, self.height], dtype=torch.float32)
        return num, boxes / scale, scores, classes, masks
