"""detectron2's Mask R-CNN inference rules, written plainly (one image at a time, eager torch ops) on a
torchvision MaskRCNN's modules: the reference the fast engine's detectron2 semantics are tested
against, without detectron2 installed. Each function follows the detectron2 step named in its
docstring (ResizeShortestEdge with PIL, find_top_rpn_proposals, ROIPooler with ROIAlignV2,
fast_rcnn_inference, mask_rcnn_inference, detector_postprocess, paste_masks_in_image on the CPU)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import batched_nms, roi_align

from dd.models.semantics import DETECTRON2, Semantics


def paste(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5) -> np.ndarray:
    """paste_masks_in_image on the CPU: per box, only [max(floor(x0) - 1, 0), min(ceil(x1) + 1, W)) x
    (likewise y) is computed, by F.grid_sample of the mask at each pixel centre; N x H x W bool."""
    out = np.zeros((len(masks), height, width), bool)
    for i in range(len(masks)):
        box = boxes[i].float()
        x0i = max(int(math.floor(float(box[0]))) - 1, 0)
        y0i = max(int(math.floor(float(box[1]))) - 1, 0)
        x1i = min(int(math.ceil(float(box[2]))) + 1, width)
        y1i = min(int(math.ceil(float(box[3]))) + 1, height)
        if x1i <= x0i or y1i <= y0i:
            continue
        xs = (torch.arange(x0i, x1i, dtype=torch.float32) + 0.5 - box[0]) / (box[2] - box[0]) * 2 - 1
        ys = (torch.arange(y0i, y1i, dtype=torch.float32) + 0.5 - box[1]) / (box[3] - box[1]) * 2 - 1
        grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], -1)
        value = F.grid_sample(masks[i][None, None].float(), grid[None], align_corners=False)[0, 0]
        out[i, y0i:y1i, x0i:x1i] = (value >= threshold).numpy()
    return out


def levels(boxes: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """assign_boxes_to_levels: floor(4 + log2(sqrt(area) / 224 + 1e-8)), clamped, from 0."""
    size = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    lvl = torch.floor(4 + torch.log2(size / 224 + 1e-8))
    return lvl.clamp(min=k_min, max=k_max).to(torch.int64) - k_min


def pool(feats: list[torch.Tensor], boxes: torch.Tensor, output_size: int, image_size: tuple[int, int]) -> torch.Tensor:
    """ROIPooler with ROIAlignV2 (aligned, sampling ratio 0) for one image's boxes, level by level."""
    scales = [2.0 ** round(math.log2(f.shape[-2] / image_size[0])) for f in feats]  # strides 4, 8, ...
    k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
    which = levels(boxes, k_min, k_max)
    out = torch.zeros(len(boxes), feats[0].shape[1], output_size, output_size)
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)
    for lvl, (feat, scale) in enumerate(zip(feats, scales)):
        idx = (which == lvl).nonzero()[:, 0]
        if len(idx):
            out[idx] = roi_align(feat.float(), rois[idx], output_size, scale, 0, True)
    return out


def preprocess(model: torch.nn.Module, color: np.ndarray, depth: np.ndarray | None, size: tuple[int, int],
               depth_fill: float) -> torch.Tensor:
    """ResizeShortestEdge then the model's normalisation, padded to 32: an RGB image through PIL's
    uint8 bilinear resize; color + depth (metres, missing filled) as one float image, F.interpolate."""
    rh, rw = size
    mean = torch.tensor(model.transform.image_mean)[:, None, None]
    std = torch.tensor(model.transform.image_std)[:, None, None]
    if depth is None:
        resized = np.array(Image.fromarray(color).resize((rw, rh), Image.BILINEAR))
        x = (torch.from_numpy(resized).permute(2, 0, 1).float() / 255 - mean) / std
    else:
        d = torch.from_numpy(depth.astype(np.float32) * np.float32(0.001) if depth.dtype == np.uint16 else depth)
        d = torch.where(d > 0, d, torch.full_like(d, depth_fill))
        x = torch.cat([torch.from_numpy(color).permute(2, 0, 1).float() / 255, d[None]])
        x = F.interpolate(((x - mean) / std)[None], size=(rh, rw), mode="bilinear", align_corners=False)[0]
    out = torch.zeros(x.shape[0], -(-rh // 32) * 32, -(-rw // 32) * 32)
    out[:, :rh, :rw] = x
    return out


def proposals(model: torch.nn.Module, objectness: list[torch.Tensor], deltas: list[torch.Tensor],
              anchors: torch.Tensor, size: tuple[int, int], min_size: float = 0.0) -> torch.Tensor:
    """find_top_rpn_proposals for one image: top-k logits per level, clip, keep non-empty, NMS per
    level by logit, the best post_nms_top_n."""
    rpn = model.rpn
    per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
    obj, dl = concat_box_prediction_layers(objectness, deltas)
    boxes = rpn.box_coder.decode(dl, [anchors]).view(-1, 4)
    obj = obj.view(-1)
    picked, lvl, start = [], [], 0
    for level, n in enumerate(per_level):
        top = obj[start:start + n].topk(min(rpn.pre_nms_top_n(), n)).indices + start
        picked.append(top)
        lvl.append(torch.full((len(top),), level))
        start += n
    top, lvl = torch.cat(picked), torch.cat(lvl)
    b, s = boxes[top], obj[top]
    b[:, 0::2] = b[:, 0::2].clamp(0, size[1])
    b[:, 1::2] = b[:, 1::2].clamp(0, size[0])
    keep = ((b[:, 2] - b[:, 0]) > min_size) & ((b[:, 3] - b[:, 1]) > min_size)
    b, s, lvl = b[keep], s[keep], lvl[keep]
    keep = batched_nms(b, s, lvl, rpn.nms_thresh)[: rpn.post_nms_top_n()]
    return b[keep]


@torch.inference_mode()
def infer(model: torch.nn.Module, color: np.ndarray, depth: np.ndarray | None, min_size: int, max_size: int,
          score_threshold: float, depth_fill: float = 0.0, mask_threshold: float = 0.5,
          semantics: Semantics = DETECTRON2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DefaultPredictor's answer for one image: boxes (input pixels), scores, labels, full-image masks."""
    h, w = color.shape[:2]
    rh, rw = semantics.resized_size(h, w, min_size, max_size)
    x = preprocess(model, color, depth, (rh, rw), depth_fill)[None]
    feats = model.backbone(x)
    flist = list(feats.values())
    objectness, deltas = model.rpn.head(flist)
    anchors = model.rpn.anchor_generator(ImageList(x, [(rh, rw)]), flist)[0]
    props = proposals(model, objectness, deltas, anchors, (rh, rw), semantics.rpn_min_size)
    heads = model.roi_heads
    names = heads.box_roi_pool.featmap_names
    pooled = pool([feats[k] for k in names], props, 7, (rh, rw))
    logits, regression = heads.box_predictor(heads.box_head(pooled))
    boxes = heads.box_coder.decode(regression, [props])  # R x C x 4
    scores = F.softmax(logits, -1)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, rw)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, rh)
    boxes, scores = boxes[:, 1:], scores[:, 1:]  # background is class 0 in torchvision's layout
    found = (scores > score_threshold).nonzero()
    b, s, labels = boxes[found[:, 0], found[:, 1]], scores[found[:, 0], found[:, 1]], found[:, 1] + 1
    keep = batched_nms(b, s, labels, heads.nms_thresh)[: heads.detections_per_img]
    b, s, labels = b[keep], s[keep], labels[keep]
    mask_names = heads.mask_roi_pool.featmap_names
    mask_logits = heads.mask_predictor(heads.mask_head(pool([feats[k] for k in mask_names], b, 14, (rh, rw))))
    probs = mask_logits[torch.arange(len(b)), labels].sigmoid()
    # detector_postprocess: scale by Python floats, clip to the input image, drop empty boxes
    b = b * torch.tensor([w / rw, h / rh, w / rw, h / rh], dtype=torch.float32)
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    keep = ((b[:, 2] - b[:, 0]) > semantics.min_box_size) & ((b[:, 3] - b[:, 1]) > semantics.min_box_size)
    b, s, labels, probs = b[keep], s[keep], labels[keep], probs[keep]
    return b.numpy(), s.numpy(), labels.numpy(), paste(probs, b, h, w, mask_threshold)
