"""The two graph flavours' NMS and multi-level RoI Align, behind one interface.

ExportableMaskRCNN (network.py) calls three steps it leaves to an ops object:

- ``rpn_nms``: NMS of the RPN's candidates per FPN level, then the top post_nms_topk per image;
- ``box_nms``: class-wise NMS of the detections, then the top DETECTIONS_PER_IMAGE, in the
  padded layout of EfficientNMS_TRT (num_detections, boxes, scores, classes);
- ``roi_pool``: RoI Align over the FPN levels with the model's level rule.

OnnxOps writes them with standard ONNX operators (NonMaxSuppression, TopK, RoiAlign,
ScatterND) that ONNX Runtime runs: exact, and batched (several images run as one).
TensorRTOps writes them as TensorRT's plugin nodes EfficientNMS_TRT and PyramidROIAlign_TRT
(autograd Functions whose ``symbolic`` emits the node; their ``forward`` is a torch reading of
the plugin's documented behaviour, used while tracing and by the tests, which have no TensorRT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torchvision
from torchvision.ops import roi_align

INF = float("inf")


class ExportError(ValueError):
    """The model cannot be exported in the asked format; the message says why and what to do."""


@dataclass(frozen=True)
class LevelRule:
    """A RoI pooler: its feature maps, their scales, the level rule and RoI Align's parameters."""

    names: list[str]
    scales: list[float]
    k_min: int
    k_max: int
    size: int
    sampling_ratio: int
    aligned: bool
    mapper: str  # "torchvision" or "detectron2"

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """The pooled level (0-based) of each box [R, 4], as the source model's level mapper."""
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        s = torch.sqrt(area)
        if self.mapper == "detectron2":
            lvl = torch.floor(4 + torch.log2(s / 224 + 1e-8))
        else:  # torchvision's LevelMapper
            lvl = torch.floor(4 + torch.log2(s / 224) + torch.tensor(1e-6, dtype=s.dtype))
        return torch.clamp(lvl, min=self.k_min, max=self.k_max).to(torch.int64) - self.k_min


class GraphOps(Protocol):
    def rpn_nms(self, boxes: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor, levels: torch.Tensor,
                num_levels: int, iou: float, topk: int, by_logits: bool) -> tuple[torch.Tensor, torch.Tensor]: ...

    def box_nms(self, boxes: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor, score_threshold: torch.Tensor,
                iou: float, detections: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def roi_pool(self, feats: dict[str, torch.Tensor], boxes: torch.Tensor, rule: LevelRule,
                 canvas: tuple[int, int]) -> torch.Tensor: ...


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] rows idx [B, K] -> [B, K, ...]."""
    shape = list(idx.shape) + [1] * (x.dim() - 2)
    return torch.gather(x, 1, idx.reshape(shape).expand(*idx.shape, *x.shape[2:]))


# -- ONNX Runtime: standard operators ---------------------------------------------------------------

class _BatchedNMS(torch.autograd.Function):
    """ONNX NonMaxSuppression over [B, N] candidates of one class: selected (batch, 0, index) rows.

    Candidates scoring -inf are not there. Groups (levels, classes) are kept apart by the caller with
    torchvision's coordinate offset, as torchvision's batched_nms does under tracing.
    """

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:  # type: ignore[override]
        rows = []
        for b in range(boxes.shape[0]):
            idx = torch.nonzero(torch.isfinite(scores[b]))[:, 0]
            keep = idx[torchvision.ops.nms(boxes[b][idx], scores[b][idx], iou)]
            rows.append(torch.stack([torch.full_like(keep, b), torch.zeros_like(keep), keep], dim=1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, iou: float):  # noqa: ANN001, ANN205 - the TorchScript exporter's interface
        axes = g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64))
        scores3 = g.op("Unsqueeze", scores, axes)  # [B, 1, N]
        max_out = g.op("Constant", value_t=torch.tensor([1 << 30], dtype=torch.int64))
        iou_t = g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32))
        floor = g.op("Constant", value_t=torch.tensor([-3.0e38], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores3, max_out, iou_t, floor)


def _padded_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float, topk: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NMS within groups over boxes [B, N, 4] and scores [B, N] (-inf: absent), groups [N]; the top
    `topk` survivors per image by score. Returns their indices [B, K], validity [B, K] and scores."""
    b, n = scores.shape
    offset = groups.to(boxes.dtype)[None, :, None] * (boxes.max() + 1)
    selected = _BatchedNMS.apply(boxes + offset, scores, iou)
    kept = torch.zeros((b, n), dtype=torch.bool)
    kept[selected[:, 0], selected[:, 2]] = True
    survivors = torch.where(kept, scores, torch.full_like(scores, -INF))
    top, idx = survivors.topk(min(topk, n), dim=1)
    return idx, torch.isfinite(top), top


class OnnxOps:
    """Standard ONNX operators: what ONNX Runtime runs, with the source model's arithmetic."""

    flavour = "onnx"

    def rpn_nms(self, boxes, logits, keep, levels, num_levels, iou, topk, by_logits):  # noqa: ANN001, ANN201
        # detectron2 ranks the proposals by their logits, torchvision by their probabilities
        scores = logits if by_logits else torch.sigmoid(logits)
        masked = torch.where(keep, scores, torch.full_like(scores, -INF))
        idx, valid, _ = _padded_nms(boxes, masked, levels, iou, topk)
        return _gather_rows(boxes, idx), valid

    def box_nms(self, boxes, scores, keep, score_threshold, iou, detections):  # noqa: ANN001, ANN201
        b, p, k = scores.shape
        flat_boxes = boxes.reshape(b, p * k, 4)
        flat = scores.reshape(b, p * k)
        ok = keep.reshape(b, p * k) & (flat > score_threshold)
        masked = torch.where(ok, flat, torch.full_like(flat, -INF))
        classes = torch.arange(k).repeat(p)
        idx, valid, top = _padded_nms(flat_boxes, masked, classes, iou, detections)
        out_boxes = _gather_rows(flat_boxes, idx) * valid[..., None]
        out_scores = torch.where(valid, top, torch.zeros_like(top))
        out_classes = torch.where(valid, idx % k, torch.zeros_like(idx)).to(torch.int32)
        pad = detections - idx.shape[1]
        if pad > 0:  # fewer candidates than detections: pad to the layout's N rows
            out_boxes = torch.nn.functional.pad(out_boxes, (0, 0, 0, pad))
            out_scores = torch.nn.functional.pad(out_scores, (0, pad))
            out_classes = torch.nn.functional.pad(out_classes, (0, pad))
        num = valid.sum(dim=1, keepdim=True).to(torch.int32)
        return num, out_boxes, out_scores, out_classes

    def roi_pool(self, feats, boxes, rule, canvas):  # noqa: ANN001, ANN201
        b, r = boxes.shape[:2]
        flat = boxes.reshape(b * r, 4)
        batch = torch.arange(b, dtype=boxes.dtype).repeat_interleave(r)[:, None]
        rois = torch.cat([batch, flat], dim=1)
        maps = [feats[name] for name in rule.names]
        c = maps[0].shape[1]
        if len(maps) == 1:
            return roi_align(maps[0], rois, rule.size, rule.scales[0], rule.sampling_ratio, rule.aligned)
        levels = rule.levels(flat)
        out = torch.zeros((b * r, c, rule.size, rule.size), dtype=maps[0].dtype)
        for level, (feat, scale) in enumerate(zip(maps, rule.scales)):
            idx = torch.nonzero(levels == level)[:, 0]
            pooled = roi_align(feat, rois[idx], rule.size, scale, rule.sampling_ratio, rule.aligned)
            out = out.index_put((idx,), pooled)
        return out


# -- TensorRT: plugin nodes ---------------------------------------------------------------------------

class EfficientNMSTRT(torch.autograd.Function):
    """TensorRT's EfficientNMS_TRT (standard mode, BoxCorner coding): boxes [B, N, 4] or [B, N, G, 4],
    scores [B, N, G] -> num_detections [B, 1] int32, boxes [B, K, 4], scores [B, K], classes [B, K] int32.

    forward reads the plugin's README: scores below score_threshold are dropped, the rest sorted,
    NMS per class (IoU > iou_threshold suppresses), the top max_output_boxes kept, zero padded.
    """

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float,  # type: ignore[override]
                iou_threshold: float, max_output_boxes: int) -> tuple[torch.Tensor, ...]:
        b, n, g = scores.shape
        per_class = boxes if boxes.dim() == 4 else boxes[:, :, None].expand(b, n, g, 4)
        num = torch.zeros((b, 1), dtype=torch.int32)
        out_b = torch.zeros((b, max_output_boxes, 4), dtype=boxes.dtype)
        out_s = torch.zeros((b, max_output_boxes), dtype=scores.dtype)
        out_c = torch.zeros((b, max_output_boxes), dtype=torch.int32)
        for i in range(b):
            s = scores[i].reshape(-1)
            cand = torch.nonzero(s >= score_threshold)[:, 0]
            bx = per_class[i].reshape(-1, 4)[cand]
            cls = cand % g
            keep = torchvision.ops.batched_nms(bx, s[cand], cls, iou_threshold)[:max_output_boxes]
            k = keep.numel()
            num[i, 0] = k
            out_b[i, :k] = bx[keep]
            out_s[i, :k] = s[cand][keep]
            out_c[i, :k] = cls[keep].to(torch.int32)
        return num, out_b, out_s, out_c

    @staticmethod
    def symbolic(g, boxes, scores, score_threshold: float, iou_threshold: float, max_output_boxes: int):  # noqa: ANN001, ANN205
        outs = g.op("trt::EfficientNMS_TRT", boxes, scores, outputs=4, plugin_version_s="1",
                    background_class_i=-1, max_output_boxes_i=max_output_boxes, score_threshold_f=score_threshold,
                    iou_threshold_f=iou_threshold, score_activation_i=0, class_agnostic_i=0, box_coding_i=0)
        for out, dtype in zip(outs, (torch.int32, torch.float32, torch.float32, torch.int32)):
            out.setType(scores.type().with_dtype(dtype))  # shapes: set by the graph surgery
        return outs


class PyramidROIAlignTRT(torch.autograd.Function):
    """TensorRT's PyramidROIAlign_TRT: rois [B, R, 4] (absolute x1, y1, x2, y2 here) and the P2..P5 maps
    -> [B, R, C, P, P]. forward reads the plugin's source: level = P2 + floor(log2(sqrt(area) /
    fpn_scale) + 2), clamped to P2..P5 (no epsilon); roi_coords_transform 2 is ROIAlignV2 (half-pixel
    offset), 0 none; sampling_ratio 0 adaptive."""

    @staticmethod
    def forward(ctx, rois: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor, p4: torch.Tensor,  # type: ignore[override]
                p5: torch.Tensor, pooled_size: int, image_size: list[int], transform: int,
                sampling_ratio: int) -> torch.Tensor:
        b, r = rois.shape[:2]
        flat = rois.reshape(b * r, 4)
        area = (flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1])
        level = torch.clamp(torch.floor(4 + torch.log2(torch.sqrt(area) / 224)), 2, 5).long() - 2
        batch = torch.arange(b, dtype=rois.dtype).repeat_interleave(r)[:, None]
        with_batch = torch.cat([batch, flat], 1)
        out = torch.zeros((b * r, p2.shape[1], pooled_size, pooled_size), dtype=p2.dtype)
        for lv, feat in enumerate((p2, p3, p4, p5)):
            idx = torch.nonzero(level == lv)[:, 0]
            out[idx] = roi_align(feat, with_batch[idx], pooled_size, 1.0 / 2 ** (lv + 2), sampling_ratio,
                                 transform == 2)
        return out.reshape(b, r, p2.shape[1], pooled_size, pooled_size)

    @staticmethod
    def symbolic(g, rois, p2, p3, p4, p5, pooled_size: int, image_size: list[int], transform: int,  # noqa: ANN001, ANN205
                 sampling_ratio: int):
        out = g.op("trt::PyramidROIAlign_TRT", rois, p2, p3, p4, p5, plugin_version_s="1", fpn_scale_i=224,
                   pooled_size_i=pooled_size, image_size_i=list(image_size), roi_coords_absolute_i=1,
                   roi_coords_swap_i=0, roi_coords_plusone_i=0, roi_coords_transform_i=transform,
                   sampling_ratio_i=sampling_ratio, legacy_i=0)
        out.setType(p2.type())  # the shape: set by the graph surgery
        return out


class TensorRTOps:
    """TensorRT's plugins where the sample has them; the rest of the graph is standard operators."""

    flavour = "tensorrt-onnx"

    def __init__(self, score_threshold: float, rpn_score_threshold: float = 1e-6) -> None:
        # EfficientNMS_TRT takes its threshold as an attribute: the detections' is baked in at export.
        self.score_threshold = max(float(score_threshold), 1e-6)
        self.rpn_score_threshold = rpn_score_threshold

    def rpn_nms(self, boxes, logits, keep, levels, num_levels, iou, topk, by_logits):  # noqa: ANN001, ANN201
        # One NMS for every level, the levels as EfficientNMS's classes: a candidate scores in its
        # level's column only. Scores are probabilities (sigmoid of the logits: the same order, but
        # logits that saturate the sigmoid tie).
        onehot = levels[None, :, None] == torch.arange(num_levels)[None, None, :]
        prob = torch.sigmoid(logits)[:, :, None] * (onehot & keep[:, :, None]).to(logits.dtype)
        num, out, _, _ = EfficientNMSTRT.apply(boxes, prob, self.rpn_score_threshold, iou, topk)
        valid = torch.arange(topk)[None, :] < num
        return out, valid

    def box_nms(self, boxes, scores, keep, score_threshold, iou, detections):  # noqa: ANN001, ANN201
        masked = scores * keep.to(scores.dtype)
        return EfficientNMSTRT.apply(boxes, masked, self.score_threshold, iou, detections)

    @staticmethod
    def check_rule(rule: LevelRule) -> None:
        """PyramidROIAlign_TRT's limits, before anything is traced."""
        strides = [round(1 / s) for s in rule.scales]
        if len(rule.names) != 4 or strides != [4, 8, 16, 32]:
            raise ExportError(
                f"TensorRT's PyramidROIAlign_TRT pools exactly four FPN maps with strides 4, 8, 16, 32 (P2-P5); "
                f"this model pools {len(rule.names)} maps with strides {strides}. Export it with --format onnx "
                "(ONNX Runtime) instead")

    def roi_pool(self, feats, boxes, rule, canvas):  # noqa: ANN001, ANN201
        self.check_rule(rule)
        b, r = boxes.shape[:2]
        maps = [feats[n] for n in rule.names]
        out = PyramidROIAlignTRT.apply(boxes, *maps, rule.size, list(canvas), 2 if rule.aligned else 0,
                                       rule.sampling_ratio)
        return out.reshape(b * r, maps[0].shape[1], rule.size, rule.size)

