"""The network a Detectron2Spec describes, built from torchvision's Mask R-CNN parts, with detectron2's rules.

The module tree is torchvision's (``backbone.body`` a ResNet of torchvision's BasicBlock /
Bottleneck with conv1/bn1/relu/maxpool/layer1..4, ``backbone.fpn`` torchvision's FPN with the
max-pool top level, ``rpn.head``/``rpn.anchor_generator``, ``roi_heads.box_roi_pool/box_head/
box_predictor/mask_roi_pool/mask_head/mask_predictor``), so every engine that walks a torchvision
Mask R-CNN (the fast GPU engine's fusions and kernels) finds what it expects. Where detectron2's
inference differs, small subclasses carry its rules:

- ResNet widths from RES2_OUT_CHANNELS / NUM_GROUPS / WIDTH_PER_GROUP / STEM_OUT_CHANNELS, the
  stride in the first 1x1 convolution with STRIDE_IN_1X1, a shortcut wherever a block changes width,
  and frozen batch norm computed as detectron2 computes it (F.batch_norm, eps 1e-5);
- anchors as detectron2's DefaultAnchorGenerator: not rounded, OFFSET, fixed strides 2**k, sizes
  before aspect ratios in the cell order;
- RPN: top-k per level on the logits, boxes clipped, empty ones (side <= MIN_SIZE) dropped, NMS per
  level on the logits, POST_NMS_TOPK_TEST per image;
- RoI pooling: ROIAlignV2 (aligned, adaptive sampling by default) and detectron2's level rule
  floor(4 + log2(sqrt(area) / 224 + 1e-8)), clamped to the pooled levels, strides fixed;
- detections: boxes clipped, scores > SCORE_THRESH_TEST, class-wise NMS, no small-box removal,
  DETECTIONS_PER_IMAGE.

The model carries ``semantics = DETECTRON2`` (dd.models.semantics) for engines that reimplement steps.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from dd.models.detectron2.config import BLOCKS_PER_STAGE, Detectron2Spec
from dd.models.semantics import DETECTRON2

CANONICAL_BOX_SIZE = 224
CANONICAL_LEVEL = 4


class FrozenBatchNorm(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, so batch-norm folding finds it) computed as
    detectron2's FrozenBatchNorm2d computes it at inference: F.batch_norm on the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)


def _basic_block(cin: int, cout: int, stride: int) -> BasicBlock:
    down = nn.Sequential(_conv(cin, cout, 1, stride), FrozenBatchNorm(cout)) if cin != cout else None
    return BasicBlock(cin, cout, stride, down, norm_layer=FrozenBatchNorm)


def _bottleneck(cin: int, cout: int, width: int, stride: int, groups: int, stride_in_1x1: bool) -> Bottleneck:
    """torchvision's Bottleneck with detectron2's widths (any bottleneck and output width) and stride placement."""
    block = Bottleneck(cin, max(1, cout // Bottleneck.expansion), norm_layer=FrozenBatchNorm)
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    block.conv1, block.bn1 = _conv(cin, width, 1, s1), FrozenBatchNorm(width)
    block.conv2, block.bn2 = _conv(width, width, 3, s3, groups), FrozenBatchNorm(width)
    block.conv3, block.bn3 = _conv(width, cout, 1), FrozenBatchNorm(cout)
    block.downsample = nn.Sequential(_conv(cin, cout, 1, stride), FrozenBatchNorm(cout)) if cin != cout else None
    block.stride = stride
    return block


class ResNetBody(nn.Module):
    """detectron2's ResNet (stem + res2..res5) under torchvision's names: conv1, bn1, relu, maxpool, layer1..4."""

    def __init__(self, spec: Detectron2Spec) -> None:
        super().__init__()
        self.conv1 = _conv(spec.channels, spec.stem_out_channels, 7, 2)
        self.bn1 = FrozenBatchNorm(spec.stem_out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin, cout = spec.stem_out_channels, spec.res2_out_channels
        width = spec.num_groups * spec.width_per_group
        for idx, blocks in enumerate(BLOCKS_PER_STAGE[spec.depth]):
            layer = []
            for b in range(blocks):
                stride = 2 if idx > 0 and b == 0 else 1
                if spec.depth in (18, 34):
                    layer.append(_basic_block(cin, cout, stride))
                else:
                    layer.append(_bottleneck(cin, cout, width, stride, spec.num_groups, spec.stride_in_1x1))
                cin = cout
            setattr(self, f"layer{idx + 1}", nn.Sequential(*layer))
            cout *= 2
            width *= 2

    def stage_channels(self, stage: int) -> int:
        """Output channels of res<stage> (2..5)."""
        last = getattr(self, f"layer{stage - 1}")[-1]
        return last.conv3.out_channels if isinstance(last, Bottleneck) else last.conv2.out_channels


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """detectron2's DefaultAnchorGenerator.generate_cell_anchors: for each size, each ratio; not rounded."""
    anchors = []
    for size in sizes:
        area = size ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class Detectron2AnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator interface with detectron2's anchors: unrounded cells, OFFSET, fixed strides."""

    def __init__(self, sizes: tuple[tuple[float, ...], ...], aspect_ratios: tuple[tuple[float, ...], ...],
                 strides: tuple[int, ...], offset: float) -> None:
        super().__init__(sizes, aspect_ratios)
        self.cell_anchors = [cell_anchors(s, a) for s, a in zip(sizes, aspect_ratios)]
        self.strides = tuple(strides)
        self.offset = float(offset)

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def level_anchors(self, grid_sizes: list[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
        """One (H * W * A) x 4 float32 tensor per level: location-major, cell anchors within a location."""
        out = []
        for (gh, gw), stride, base in zip(grid_sizes, self.strides, self.cell_anchors):
            shifts_x = torch.arange(self.offset * stride, gw * stride, step=stride, dtype=torch.float32, device=device)
            shifts_y = torch.arange(self.offset * stride, gh * stride, step=stride, dtype=torch.float32, device=device)
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            out.append((shifts.view(-1, 1, 4) + base.to(device).view(1, -1, 4)).reshape(-1, 4))
        return out

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [tuple(int(s) for s in fm.shape[-2:]) for fm in feature_maps]
        anchors = torch.cat(self.level_anchors(grid_sizes, feature_maps[0].device))  # type: ignore[arg-type]
        return [anchors for _ in range(len(image_list.image_sizes))]


class Detectron2RPN(RegionProposalNetwork):
    """torchvision's RPN with detectron2's find_top_rpn_proposals: logits (not probabilities) rank and
    suppress, boxes with a side <= min_size are dropped (strictly), nothing else."""

    def filter_proposals(self, proposals: torch.Tensor, objectness: torch.Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        batch_idx = torch.arange(num_images, device=device)
        scores, boxes, levels = [], [], []
        start = 0
        for level, n in enumerate(num_anchors_per_level):
            logits = objectness[:, start:start + n]
            k = min(n, self.pre_nms_top_n())
            top_scores, top_idx = logits.topk(k, dim=1)
            boxes.append(proposals[:, start:start + n][batch_idx[:, None], top_idx])
            scores.append(top_scores)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=device))
            start += n
        all_scores, all_boxes, all_levels = torch.cat(scores, 1), torch.cat(boxes, 1), torch.cat(levels)
        final_boxes, final_scores = [], []
        for b, s, shape in zip(all_boxes, all_scores, image_shapes):
            lvl = all_levels
            valid = torch.isfinite(b).all(dim=1) & torch.isfinite(s)
            if not bool(valid.all()):
                b, s, lvl = b[valid], s[valid], lvl[valid]
            b = box_ops.clip_boxes_to_image(b, shape)
            wh = b[:, 2:] - b[:, :2]
            keep = (wh > self.min_size).all(dim=1)
            if not bool(keep.all()):
                b, s, lvl = b[keep], s[keep], lvl[keep]
            keep = box_ops.batched_nms(b.float(), s, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(b[keep])
            final_scores.append(s[keep])
        return final_boxes, final_scores


class Detectron2LevelMapper:
    """torchvision's LevelMapper interface with detectron2's rule: floor(4 + log2(sqrt(area) / 224 + 1e-8))."""

    def __init__(self, k_min: int, k_max: int) -> None:
        self.k_min, self.k_max = k_min, k_max
        self.s0, self.lvl0, self.eps = CANONICAL_BOX_SIZE, CANONICAL_LEVEL, 1e-8

    def __call__(self, boxlists: list[torch.Tensor]) -> torch.Tensor:
        boxes = torch.cat(boxlists)
        sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        levels = torch.floor(self.lvl0 + torch.log2(sizes / self.s0 + self.eps))
        return torch.clamp(levels, min=self.k_min, max=self.k_max).to(torch.int64) - self.k_min


class Detectron2RoIPool(MultiScaleRoIAlign):
    """detectron2's ROIPooler (ROIAlign / ROIAlignV2 per level, its level rule, scales 1 / stride) with
    torchvision's MultiScaleRoIAlign interface (featmap_names, scales, map_levels, sampling_ratio)."""

    def __init__(self, featmap_names: list[str], strides: list[int], output_size: int, sampling_ratio: int,
                 aligned: bool) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio, canonical_scale=CANONICAL_BOX_SIZE,
                         canonical_level=CANONICAL_LEVEL)
        self.strides = list(strides)
        self.scales = [1.0 / s for s in strides]
        self.aligned = aligned
        self.map_levels = Detectron2LevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])))

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b], dim=1)
                          for i, b in enumerate(boxes)], dim=0)
        size = self.output_size
        if len(feats) == 1:
            return roi_align(feats[0], rois.to(feats[0].dtype), size, self.scales[0], self.sampling_ratio,
                             self.aligned)
        c = feats[0].shape[1]
        out = torch.zeros((rois.shape[0], c, *size), dtype=feats[0].dtype, device=feats[0].device)
        if rois.shape[0] == 0:
            return out
        levels = self.map_levels(boxes)
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.nonzero(levels == level, as_tuple=True)[0]
            out.index_put_((idx,), roi_align(feat, rois[idx].to(feat.dtype), size, scale, self.sampling_ratio,
                                             self.aligned))
        return out


class FlatteningPredictor(FastRCNNPredictor):
    """FastRCNNPredictor that flattens any input, as detectron2's FastRCNNOutputLayers (a box head with no
    fully connected layer hands it C x H x W features)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class Detectron2RoIHeads(RoIHeads):
    """torchvision's RoIHeads with detectron2's fast_rcnn_inference: no small-box removal, non-finite
    predictions dropped, scores > score_thresh, class-wise NMS, detections_per_img by score."""

    def postprocess_detections(self, class_logits: torch.Tensor, box_regression: torch.Tensor,
                               proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]
                               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).reshape(len(class_logits),
                                                                               class_logits.shape[1], 4)
        pred_scores = F.softmax(class_logits, -1)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes.split(per_image), pred_scores.split(per_image), image_shapes):
            valid = torch.isfinite(boxes).flatten(1).all(dim=1) & torch.isfinite(scores).all(dim=1)
            if not bool(valid.all()):
                boxes, scores = boxes[valid], scores[valid]
            boxes = box_ops.clip_boxes_to_image(boxes[:, 1:], shape)  # R x K x 4, background dropped
            scores = scores[:, 1:]
            mask = scores > self.score_thresh
            inds = mask.nonzero()
            boxes, scores = boxes[mask], scores[mask]
            keep = box_ops.batched_nms(boxes.float(), scores, inds[:, 1], self.nms_thresh)
            if self.detections_per_img >= 0:
                keep = keep[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(inds[keep, 1] + 1)
        return all_boxes, all_scores, all_labels


def build_network(spec: Detectron2Spec) -> MaskRCNN:
    """A randomly initialised network of the spec's shape, in eval mode; load convert_state_dict's output into it.

    It takes R, G, B (then D) channels (convert.py reverses a BGR stem). Feature maps are named
    "0", "1", ... and "pool" as in torchvision. The torchvision transform is configured but the
    engines preprocess themselves (preprocess.py): model.transform is not detectron2's resize.
    """
    body = ResNetBody(spec)
    stages = [int(f[3:]) for f in spec.fpn_in_features]
    return_layers = {f"layer{s - 1}": str(i) for i, s in enumerate(stages)}
    backbone = BackboneWithFPN(body, return_layers, [body.stage_channels(s) for s in stages], spec.fpn_out_channels,
                               extra_blocks=LastLevelMaxPool())
    names = {level: (str(i) if i < len(stages) else "pool") for i, level in enumerate(spec.fpn_levels)}
    strides = tuple(spec.stride(level) for level in spec.fpn_levels)
    anchors = Detectron2AnchorGenerator(spec.anchor_sizes, spec.anchor_aspect_ratios, strides, spec.anchor_offset)
    rpn_head = RPNHead(spec.fpn_out_channels, anchors.num_anchors_per_location()[0], conv_depth=spec.rpn_conv_depth)

    roi_names = [names[level] for level in spec.roi_in_features]
    roi_strides = [spec.stride(level) for level in spec.roi_in_features]
    res, ch = spec.box_pooler_resolution, spec.fpn_out_channels
    if spec.box_num_conv == 0 and spec.box_num_fc == 2:
        box_head: nn.Module = TwoMLPHead(ch * res * res, spec.box_fc_dim)
    else:
        box_head = FastRCNNConvFCHead((ch, res, res), [spec.box_conv_dim] * spec.box_num_conv,
                                      [spec.box_fc_dim] * spec.box_num_fc)
    box_out = spec.box_fc_dim if spec.box_num_fc else (spec.box_conv_dim if spec.box_num_conv else ch) * res * res
    mask_ch = spec.mask_conv_dim if spec.mask_num_conv else ch

    mean, std = spec.rgb_mean_std()
    color_mean = [m / 255.0 for m in mean[:3]] + list(mean[3:])
    color_std = [s / 255.0 for s in std[:3]] + list(std[3:])
    k = spec.num_classes + 1
    model = MaskRCNN(
        backbone, num_classes=None, min_size=spec.min_size_test, max_size=spec.max_size_test,
        image_mean=color_mean, image_std=color_std, rpn_anchor_generator=anchors, rpn_head=rpn_head,
        box_roi_pool=Detectron2RoIPool(roi_names, roi_strides, res, spec.box_pooler_sampling_ratio,
                                       spec.box_pooler_aligned),
        box_head=box_head, box_predictor=FlatteningPredictor(box_out, k),
        mask_roi_pool=Detectron2RoIPool(roi_names, roi_strides, spec.mask_pooler_resolution,
                                        spec.mask_pooler_sampling_ratio, spec.mask_pooler_aligned),
        mask_head=MaskRCNNHeads(ch, [spec.mask_conv_dim] * spec.mask_num_conv, 1),
        mask_predictor=MaskRCNNPredictor(mask_ch, spec.mask_conv_dim, k),
    )
    topk = spec.rpn_pre_nms_topk_test
    model.rpn = Detectron2RPN(anchors, rpn_head, 0.7, 0.3, 256, 0.5, dict(training=topk, testing=topk),
                              dict(training=spec.rpn_post_nms_topk_test, testing=spec.rpn_post_nms_topk_test),
                              spec.rpn_nms_thresh, score_thresh=0.0)
    model.rpn.box_coder.weights = tuple(spec.rpn_bbox_reg_weights)
    model.rpn.min_size = spec.rpn_min_size
    old = model.roi_heads
    model.roi_heads = Detectron2RoIHeads(
        old.box_roi_pool, old.box_head, old.box_predictor, 0.5, 0.5, 512, 0.25, tuple(spec.box_bbox_reg_weights),
        spec.score_thresh_test, spec.nms_thresh_test, spec.detections_per_image, old.mask_roi_pool, old.mask_head,
        old.mask_predictor)
    model.semantics = DETECTRON2
    model.feature_names = OrderedDict(names)  # detectron2 level name (p2, ...) -> feature map name ("0", ...)
    return model.eval()  # an inference network: the training paths are torchvision's, not detectron2's
