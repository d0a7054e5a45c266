"""Mask R-CNN's post-processing with fixed shapes and no host synchronisation.

torchvision's detection steps return as many boxes as survive each filter, so
every step waits for the GPU to say how many (a host sync), and the Python
around them launches a few hundred small kernels per image. None of that can
be captured in a CUDA graph. The versions here keep every tensor at its upper
bound (pre-NMS top-k, post-NMS top-n, max detections) with a validity mask, so
backbone, RPN, box head, NMS and mask head replay as one graph and the host
learns the counts once, at the end.

Greedy NMS is computed as a fixed point: box i is kept iff no kept box before
it (in descending score) overlaps it by more than the threshold. Iterating
keep <- valid & not(any(keep[j] & overlap[j, i], j < i)) from keep = valid
settles on the greedy answer (the fixed point is unique, since "before" is a
strict order), usually within a few iterations; each is one batched
matrix-vector product. Whether it settled is returned, and an image whose
NMS did not settle, or whose class-wise NMS needed more than the top-k
candidates, is redone by the caller on the exact dynamic path: the answers are
torchvision's either way.

Where the model's weights come from detectron2, its `semantics` attribute
(dd.models.semantics) says which of the steps follow detectron2's rules
instead: the RPN ranks proposals by logit and keeps every non-empty one, RoI
Align is aligned with an adaptive grid, boxes go to FPN levels by
detectron2's formula (assign_levels), and detections are not filtered by
size before their NMS (the engine drops empty ones after rescaling).
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.boxes import box_area
from torchvision.ops.poolers import LevelMapper, _setup_scales

from dd.models.semantics import TORCHVISION, Semantics
from dd.worker.engines.kernels import roi_align as roi_align_kernel
from dd.worker.engines.kernels import suppression
from dd.worker.engines.kernels.switch import KernelSwitch

log = logging.getLogger(__name__)

# Elements a tensor may have for torchvision's roi_align, which computes offsets in 32-bit ints.
STACK_LIMIT = 2**31 - 1


def box_iou_matrix(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU within each group: [..., K, 4] -> [..., K, K], with torchvision's nms arithmetic."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    lt = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
    rb = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[..., :, None] + area[..., None, :] - inter)


def decode_boxes(coder: torch.nn.Module, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """torchvision's BoxCoder.decode (same arithmetic, [N, K*4] codes against [N, 4] boxes -> [N, K, 4]),
    without the device constant it creates per call: a host-to-device copy that a CUDA graph
    capture refuses."""
    rel_codes = rel_codes.reshape(boxes.shape[0], -1)
    boxes = boxes.to(rel_codes.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = coder.weights
    dx = rel_codes[:, 0::4] / wx
    dy = rel_codes[:, 1::4] / wy
    dw = torch.clamp(rel_codes[:, 2::4] / ww, max=coder.bbox_xform_clip)
    dh = torch.clamp(rel_codes[:, 3::4] / wh, max=coder.bbox_xform_clip)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    c_to_c_w = 0.5 * (torch.exp(dw) * widths[:, None])
    c_to_c_h = 0.5 * (torch.exp(dh) * heights[:, None])
    return torch.stack((pred_ctr_x - c_to_c_w, pred_ctr_y - c_to_c_h, pred_ctr_x + c_to_c_w,
                        pred_ctr_y + c_to_c_h), dim=2)


def clip_boxes(boxes: torch.Tensor, h: int | float | torch.Tensor, w: int | float | torch.Tensor) -> torch.Tensor:
    """[B, ..., 4] boxes clipped to [0, w] x [0, h]: h and w numbers (every image the same size) or [B]
    tensors (each image its own, as on a canvas: captured as tensors, so one graph serves every size
    that fits it). The tensor bounds give the same float32 values as the number bounds."""
    x, y = boxes[..., 0::2], boxes[..., 1::2]
    if isinstance(h, torch.Tensor) or isinstance(w, torch.Tensor):
        shape = (-1,) + (1,) * (boxes.dim() - 1)
        x = torch.minimum(x.clamp(min=0), torch.as_tensor(w).to(x.dtype).view(shape))
        y = torch.minimum(y.clamp(min=0), torch.as_tensor(h).to(y.dtype).view(shape))
    else:
        x, y = x.clamp(0, w), y.clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


def large_enough(wh: torch.Tensor, min_size: float, strict: bool) -> torch.Tensor:
    """[..., 2] box sides -> [...] whether both pass the minimum: >= it (torchvision's
    remove_small_boxes) or, strict, > it (detectron2's Boxes.nonempty, which drops empty boxes at 0)."""
    return (wh > min_size).all(-1) if strict else (wh >= min_size).all(-1)


def rpn_min_size(rpn: torch.nn.Module, semantics: Semantics) -> float:
    """The smallest proposal side the RPN keeps: the model's own (torchvision's RPN carries min_size, and a
    detectron2 model's RPN its YAML's PROPOSAL_GENERATOR.MIN_SIZE), else the semantics' default."""
    return float(getattr(rpn, "min_size", semantics.rpn_min_size))


def assign_levels(boxes: torch.Tensor, k_min: int, k_max: int, rule: str = "torchvision",
                  canonical_scale: int = 224, canonical_level: int = 4) -> torch.Tensor:
    """The FPN level of each [R, 4] box, from 0 (level k_min) to k_max - k_min, by the FPN paper's
    floor(canonical_level + log2(sqrt(area) / canonical_scale)), clamped to [k_min, k_max], with each
    library's guard against rounding: torchvision adds 1e-6 after the log (its LevelMapper, used here as
    it is), detectron2 adds 1e-8 inside it (its assign_boxes_to_levels), in float32 in both. They differ
    for boxes just under a level's boundary (sqrt(area) a few millionths below 112, 224, 448, ...),
    which torchvision lifts to the level above."""
    if rule == "torchvision":
        return LevelMapper(k_min, k_max, canonical_scale, canonical_level)([boxes])
    if rule != "detectron2":
        raise ValueError(f"unknown FPN level rule {rule!r}: 'torchvision' or 'detectron2'")
    sizes = torch.sqrt(box_area(boxes))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_scale + 1e-8))
    return levels.clamp(min=k_min, max=k_max).to(torch.int64) - k_min


def top_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best along the last dimension, equal scores in index order.

    torchvision's NMS visits boxes in a stable descending sort, so when scores
    tie (saturated probabilities do) the earlier box wins; topk's order among
    ties is unspecified, so it would keep a different box of a tied pair.
    """
    values, index = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def suppression_matrix(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float,
                       labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[G, K, K]: 1 where box j is before box i, valid, of i's label, and overlaps i by more than
    the threshold (torch operations; suppression.py has the same as one kernel)."""
    k = boxes.shape[-2]
    over = box_iou_matrix(boxes.float()) > iou_threshold
    if labels is not None:
        over &= labels[..., :, None] == labels[..., None, :]
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)  # [j, i]: j before i
    return (over & earlier & valid[..., :, None]).to(dtype)


def nms_fixed(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float, iterations: int,
              labels: torch.Tensor | None = None, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS for G groups of K boxes each, already in descending score order.

    boxes [G, K, 4]; valid [G, K] (invalid boxes neither survive nor suppress);
    labels [G, K] restricts suppression to boxes of the same label (class-wise NMS).
    kernel: build the suppression matrix with the Triton kernel (suppression.py).
    Returns keep [G, K] bool and settled [G] bool (keep is greedy NMS's answer
    wherever settled is true).
    """
    k = boxes.shape[-2]
    dtype = torch.float16 if boxes.is_cuda else torch.float32
    flat = (boxes.reshape(-1, k, 4), valid.reshape(-1, k), iou_threshold,
            None if labels is None else labels.reshape(-1, k), dtype)
    suppress = (suppression.suppression_matrix(*flat) if kernel else suppression_matrix(*flat))  # [G, j, i]
    # keep as 0/1 numbers: valid - (number of kept earlier boxes that overlap), floored at 0, is
    # one matrix product with the subtraction fused (baddbmm) and a clamp per iteration. The
    # counts are integers below 2048, exact in float16.
    valid_f = valid.to(dtype).reshape(-1, 1, k)
    keep_f = prev = valid_f
    for _ in range(max(2, iterations)):
        prev = keep_f
        keep_f = torch.baddbmm(valid_f, keep_f, suppress, alpha=-1).clamp_(min=0)
    keep = (keep_f > 0).view(valid.shape)
    return keep, (keep_f == prev).all(dim=-1).view(valid.shape[:-1])


class FixedShapeHeads:
    """The RPN filtering, box head, detection NMS and mask head of one torchvision MaskRCNN, for a
    batch on one canvas (padded network input), with shapes that depend only on the batch and the
    canvas: each image's own size bounds its boxes, as numbers (every image the same) or as [B]
    tensors (clip_boxes), so one captured graph serves every size that fits the canvas."""

    def __init__(self, model: torch.nn.Module, nms_iterations: int = 24, pre_nms_topk: int = 1024,
                 kernel: bool = False, roi_kernel: bool = False, semantics: Semantics = TORCHVISION) -> None:
        self.model = model
        self.semantics = semantics
        self.iterations = nms_iterations
        self.pre_nms_topk = pre_nms_topk
        self.nms_switch = KernelSwitch("NMS kernel", "using torch operations instead", suppression.available,
                                       enabled=kernel, cuda_only=False)  # the Triton suppression matrix
        # RoI Align as one Triton kernel over the levels as they are (roi_align_kernel), instead of
        # torchvision's over a float32 level_stack.
        self.roi_switch = KernelSwitch("RoI Align kernel", "pooling from a float32 stack with torchvision's roi_align "
                                       "instead", roi_align_kernel.available, enabled=roi_kernel, cuda_only=False)
        # mask_head.ClassMaskHead, set by the engine where the model's mask head is a plain one.
        self.class_mask_head: torch.nn.Module | None = None
        self._scales: dict[tuple[object, ...], torch.Tensor] = {}
        # Per pooler: its levels' scales, first and last FPN level, canonical box size and level.
        self._setups: weakref.WeakKeyDictionary[torch.nn.Module, tuple[list[float], int, int, int, int]] = (
            weakref.WeakKeyDictionary())

    @property
    def kernel(self) -> bool:
        """Whether NMS builds its suppression matrix with the Triton kernel (until it fails here)."""
        return self.nms_switch.on

    @property
    def roi_kernel(self) -> bool:
        """Whether RoI pooling runs the Triton kernel (until it fails here)."""
        return self.roi_switch.on

    def _nms(self, boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.nms_switch.run(lambda: nms_fixed(boxes, valid, iou_threshold, self.iterations, labels, kernel=True),
                                   lambda: nms_fixed(boxes, valid, iou_threshold, self.iterations, labels), on=boxes)

    # -- RPN --------------------------------------------------------------------------------
    def proposals(self, objectness: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                  n_images: int, rh: int | torch.Tensor, rw: int | torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """torchvision's filter_proposals: top-k per level, clip, drop small and low boxes, NMS per
        level, best post_nms_top_n. Returns boxes [B, P, 4], valid [B, P], settled [B].
        rh, rw: the resized image size, numbers or [B] tensors (each image on a canvas: clip_boxes).
        With detectron2's semantics (its find_top_rpn_proposals), the ranking is by logit, with no score
        threshold, and only empty boxes are dropped."""
        rpn = self.model.rpn
        sem = self.semantics
        num_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        obj, dl = concat_box_prediction_layers(objectness, deltas)
        boxes = decode_boxes(rpn.box_coder, dl, torch.cat(anchors)).view(n_images, -1, 4)
        obj = obj.view(n_images, -1)
        ks = [min(rpn.pre_nms_top_n(), n) for n in num_per_level]
        kmax = max(ks)
        lvl_boxes, lvl_scores, lvl_valid, start = [], [], [], 0
        for n, k in zip(num_per_level, ks):
            top_obj, top = obj[:, start:start + n].topk(k, dim=1)
            b = boxes.gather(1, (top + start)[..., None].expand(-1, -1, 4))
            pad = kmax - k
            lvl_boxes.append(F.pad(b, (0, 0, 0, pad)))
            rank = top_obj if sem.rpn_rank_by_logit else top_obj.sigmoid()
            lvl_scores.append(F.pad(rank, (0, pad), value=-1.0))  # padding is invalid: never ranked
            lvl_valid.append(F.pad(torch.ones_like(top_obj, dtype=torch.bool), (0, pad), value=False))
            start += n
        cand = torch.stack(lvl_boxes, 1)  # B x L x kmax x 4, each level in descending score
        scores = torch.stack(lvl_scores, 1)
        valid = torch.stack(lvl_valid, 1)
        cand = clip_boxes(cand, rh, rw)
        wh = cand[..., 2:] - cand[..., :2]
        valid = valid & large_enough(wh, rpn_min_size(rpn, sem), sem.min_size_strict)
        if not sem.rpn_rank_by_logit:
            valid = valid & (scores >= rpn.score_thresh)
        n_levels = len(num_per_level)
        keep, settled = self._nms(cand.reshape(-1, kmax, 4), valid.reshape(-1, kmax), rpn.nms_thresh)
        ranked = torch.where(keep.view(n_images, -1), scores.view(n_images, -1), float("-inf"))
        best, idx = top_stable(ranked, rpn.post_nms_top_n())
        props = cand.view(n_images, -1, 4).gather(1, idx[..., None].expand(-1, -1, 4))
        return props, best > float("-inf"), settled.view(n_images, n_levels).all(1)

    # -- RoI pooling ------------------------------------------------------------------------
    @staticmethod
    def level_stack(levels: list[torch.Tensor], max_elements: int = STACK_LIMIT) -> list[torch.Tensor]:
        """The pyramid's levels as float32 batches [L*b, C, H, W] that RoI Align can pool every box
        from in one pass, each box from its own level (see roi_pool); one batch per run of b images.

        Each level sits at the top left of its images, followed by two rows and columns that repeat
        its last ones: a sample between the last row and the level's edge then reads the last row,
        as roi_align's clamp at a tensor's edge does; the second repeat is read with weight zero when
        a sample falls on the edge exactly. Nothing beyond is ever read, so it is left unwritten.
        Converting to float32 here is the one conversion the pooling needs (torchvision's pooler runs
        in float32 under autocast), and it also makes the layout the contiguous one roi_align wants.
        torchvision's roi_align indexes its input with 32-bit integers, so a batch stays under
        max_elements: the images are split into as many stacks as that takes (32 images of
        800x1344 would make 2.2 G elements, and an illegal memory access).
        """
        b, c = levels[0].shape[:2]
        hmax = max(f.shape[-2] for f in levels) + 2
        wmax = max(f.shape[-1] for f in levels) + 2
        step = max(1, max_elements // (len(levels) * c * hmax * wmax))
        stacks = []
        for lo in range(0, b, step):
            n = min(step, b - lo)
            out = torch.empty(len(levels) * n, c, hmax, wmax, dtype=torch.float32, device=levels[0].device)
            for lvl, feat in enumerate(levels):
                h, w = feat.shape[-2:]
                part = out[lvl * n:(lvl + 1) * n]
                part[:, :, :h, :w] = feat[lo:lo + n]
                part[:, :, h:h + 2, :w] = part[:, :, h - 1:h, :w]
                part[:, :, :h + 2, w:w + 2] = part[:, :, :h + 2, w - 1:w]
            stacks.append(out)
        return stacks

    def _setup(self, pooler: torch.nn.Module, levels: list[torch.Tensor], image_size: tuple[int, int]
               ) -> tuple[list[float], int, int, int, int]:
        """The pooler's level scales (powers of two, inferred from the levels' sizes as torchvision's
        MultiScaleRoIAlign does), first and last FPN level, canonical box size and level. Read from a
        MultiScaleRoIAlign (and set on it, as its own first call would); any other pooler needs only
        featmap_names and output_size (canonical_scale/canonical_level if it has them, else 224 and 4)."""
        setup = self._setups.get(pooler)
        if setup is None:
            scales, mapper = getattr(pooler, "scales", None), getattr(pooler, "map_levels", None)
            if scales is None or mapper is None:
                scales, mapper = _setup_scales(levels, [image_size], getattr(pooler, "canonical_scale", 224),
                                               getattr(pooler, "canonical_level", 4))
                if isinstance(pooler, MultiScaleRoIAlign):
                    pooler.scales, pooler.map_levels = scales, mapper
            setup = self._setups[pooler] = (list(scales), mapper.k_min, mapper.k_max, mapper.s0, mapper.lvl0)
        return setup

    def roi_align_rule(self, pooler: torch.nn.Module) -> tuple[int, bool]:
        """(sampling ratio, aligned) for a pooler: its own attributes where it has them (a
        MultiScaleRoIAlign has a sampling ratio, never aligned), else the semantics' (detectron2's
        ROIAlignV2: ratio 0, aligned)."""
        return (int(getattr(pooler, "sampling_ratio", self.semantics.roi_sampling_ratio)),
                bool(getattr(pooler, "aligned", self.semantics.roi_align_aligned)))

    def _levels_of(self, pooler: torch.nn.Module, levels: list[torch.Tensor], flat: torch.Tensor,
                   image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each [R, 4] box's level index and the box in that level's coordinates."""
        scales, k_min, k_max, s0, lvl0 = self._setup(pooler, levels, image_size)
        key = (tuple(scales), flat.device)
        scale_t = self._scales.get(key)
        if scale_t is None:  # made on an uncaptured call: a capture cannot copy a constant to the device
            scale_t = self._scales[key] = torch.tensor(scales, dtype=torch.float32, device=flat.device)
        which = assign_levels(flat, k_min, k_max, self.semantics.level_mapper, s0, lvl0)
        return which, flat * scale_t[which][:, None]

    def roi_pool(self, pooler: torch.nn.Module, feats: dict[str, torch.Tensor], boxes: torch.Tensor,
                 image_size: tuple[int | torch.Tensor, int | torch.Tensor], stacks: list[torch.Tensor] | None = None,
                 channels_last: bool = False, canvas: tuple[int, int] | None = None) -> torch.Tensor:
        """MultiScaleRoIAlign for [B, N, 4] boxes, as one roi_align call per level_stack.

        torchvision pools each level's boxes separately, which needs the number of boxes per level
        (a host sync). Here each box is scaled to its level by the caller (an exact power-of-two
        scale, so the sample positions are torchvision's) and pointed at that level's images in the
        stack. The pooled values match torchvision's up to the last bit of the bilinear weights at a
        level's bottom and right edges. The levels, the sampling grid and the half-pixel alignment
        follow the semantics (detectron2's ROIPooler with ROIAlignV2, where the model's are).
        image_size: (h, w) numbers, or [B] tensors of each image's own size on a canvas; then `canvas`
        (the padded network input's size) sets the levels' scales, as the feature maps' size does."""
        levels = [feats[name] for name in pooler.featmap_names]
        sampling, aligned = self.roi_align_rule(pooler)
        b, n = boxes.shape[:2]
        # Clipped to the image (the heads' boxes already are): the stack holds nothing readable
        # beyond a level's edge, where torchvision's per-level tensors would read zeros.
        flat = clip_boxes(boxes.float(), image_size[0], image_size[1]).reshape(-1, 4)
        if canvas is None:
            if isinstance(image_size[0], torch.Tensor) or isinstance(image_size[1], torch.Tensor):
                raise ValueError("roi_pool: per-image sizes need the canvas (the padded input size) for the levels' scales")
            canvas = (int(image_size[0]), int(image_size[1]))
        which, scaled = self._levels_of(pooler, levels, flat, canvas)

        def kernel() -> torch.Tensor:
            image = torch.arange(b, device=boxes.device).repeat_interleave(n)
            return roi_align_kernel.roi_align_levels(levels, which, image, scaled, pooler.output_size,
                                                     sampling, channels_last=channels_last, aligned=aligned)

        return self.roi_switch.run(
            kernel, lambda: self._pool_stacked(pooler, levels, which, scaled, flat, boxes, stacks, sampling, aligned),
            on=boxes)

    def _pool_stacked(self, pooler: torch.nn.Module, levels: list[torch.Tensor], which: torch.Tensor,
                      scaled: torch.Tensor, flat: torch.Tensor, boxes: torch.Tensor,
                      stacks: list[torch.Tensor] | None, sampling: int, aligned: bool) -> torch.Tensor:
        """roi_pool's torch path: torchvision's roi_align over the level stacks (float32)."""
        n = boxes.shape[1]
        if stacks is None:
            stacks = self.level_stack(levels)
        pooled, lo = [], 0
        for stack in stacks:
            m = stack.shape[0] // len(levels)  # images in this stack
            rows = slice(lo * n, (lo + m) * n)
            image = torch.arange(m, device=boxes.device).repeat_interleave(n)
            rois = torch.cat([(which[rows] * m + image).to(flat.dtype)[:, None], scaled[rows]], 1)
            pooled.append(roi_align(stack, rois, pooler.output_size, spatial_scale=1.0,
                                    sampling_ratio=sampling, aligned=aligned))
            lo += m
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled)

    def pool_lists(self, pooler: torch.nn.Module, feats: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                   image_size: tuple[int, int]) -> torch.Tensor:
        """The pooler's pooling for per-image box lists (the dynamic path) by the semantics' rules:
        one torchvision roi_align per level on its float32 copy, as MultiScaleRoIAlign runs it
        (roi_align_kernel.roi_align_levels_reference). Returns float32 [sum of N_i, C, oh, ow]."""
        levels = [feats[name] for name in pooler.featmap_names]
        sampling, aligned = self.roi_align_rule(pooler)
        flat = torch.cat(boxes).float()
        image = torch.cat([torch.full((len(bx),), i, dtype=torch.int64, device=flat.device)
                           for i, bx in enumerate(boxes)])
        which, scaled = self._levels_of(pooler, levels, flat, image_size)
        return roi_align_kernel.roi_align_levels_reference(levels, which, image, scaled, pooler.output_size,
                                                           sampling, torch.float32, aligned)

    # -- box head and class-wise NMS --------------------------------------------------------
    def detections(self, feats: dict[str, torch.Tensor], props: torch.Tensor, props_valid: torch.Tensor,
                   rh: int | torch.Tensor, rw: int | torch.Tensor, score_thresh: torch.Tensor, autocast: bool,
                   stacks: list[torch.Tensor] | None = None, canvas: tuple[int, int] | None = None
                   ) -> dict[str, torch.Tensor]:
        """torchvision's box head and postprocess_detections, at most detections_per_img per image
        (detectron2's fast_rcnn_inference with its semantics: no size filter here).

        The class-wise NMS looks at the pre_nms_topk best (box, class) candidates
        only: greedy NMS decides a box by the higher-scoring boxes of its class, so
        the survivors among them are the overall survivors above the k-th score,
        and the answer is torchvision's whenever they fill detections_per_img or
        no valid candidate was left out ("exact"; the caller redoes other images)."""
        heads = self.model.roi_heads
        b, n = props.shape[:2]
        pooled = self.roi_pool(heads.box_roi_pool, feats, props, (rh, rw), stacks, canvas=canvas)
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            bf = heads.box_head(pooled)
            class_logits, box_regression = heads.box_predictor(bf)
        class_logits, box_regression = class_logits.float(), box_regression.float()
        n_classes = class_logits.shape[-1]
        pred = decode_boxes(heads.box_coder, box_regression, props.reshape(-1, 4))  # B*N x C x 4
        pred = clip_boxes(pred.view(b, n * n_classes, 4), rh, rw)
        boxes = pred.view(b, n, n_classes, 4)[:, :, 1:].reshape(b, -1, 4)
        scores = F.softmax(class_logits, -1).view(b, n, n_classes)[:, :, 1:].reshape(b, -1)
        labels = torch.arange(1, n_classes, device=props.device).repeat(n)
        valid = (scores > score_thresh) & props_valid.repeat_interleave(n_classes - 1, dim=1)
        sem = self.semantics
        if sem.postprocess == "torchvision":  # small boxes go before the NMS (detectron2: after rescaling)
            valid = valid & large_enough(boxes[..., 2:] - boxes[..., :2], sem.min_box_size, sem.min_size_strict)
        masked = torch.where(valid, scores, -1.0)
        d = heads.detections_per_img
        k = min(max(self.pre_nms_topk, d), masked.shape[1])
        top_s, top_i = top_stable(masked, k)
        cand = boxes.gather(1, top_i[..., None].expand(-1, -1, 4))
        cand_labels = labels[top_i]
        keep, settled = self._nms(cand, valid.gather(1, top_i), heads.nms_thresh, cand_labels)
        exact = settled & ((keep.sum(1) >= d) | (valid.sum(1) <= k))
        best, idx = top_stable(torch.where(keep, top_s, float("-inf")), d)
        return {"boxes": cand.gather(1, idx[..., None].expand(-1, -1, 4)), "scores": best,
                "labels": cand_labels.gather(1, idx), "valid": best > float("-inf"), "exact": exact}

    # -- mask head --------------------------------------------------------------------------
    def mask_probs(self, feats: dict[str, torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor,
                   rh: int | torch.Tensor, rw: int | torch.Tensor, autocast: bool,
                   stacks: list[torch.Tensor] | None = None, canvas: tuple[int, int] | None = None) -> torch.Tensor:
        """Mask probabilities of each detection's own class: [B, D, M, M] (maskrcnn_inference)."""
        heads = self.model.roi_heads
        pooled = self.roi_pool(heads.mask_roi_pool, feats, boxes, (rh, rw), stacks,
                               channels_last=self.class_mask_head is not None, canvas=canvas)
        if self.class_mask_head is not None:
            probs = self.class_mask_head(pooled, labels.reshape(-1))
            return probs.view(*boxes.shape[:2], *probs.shape[-2:])
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            mf = heads.mask_head(pooled)
            logits = heads.mask_predictor(mf)
        logits = logits.float()
        picked = logits.gather(1, labels.reshape(-1)[:, None, None, None].expand(-1, 1, *logits.shape[-2:]))
        return picked.sigmoid().view(*boxes.shape[:2], *logits.shape[-2:])
