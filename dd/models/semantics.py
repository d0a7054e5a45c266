"""How a model's weights expect to be run: torchvision's conventions or detectron2's.

The same Mask R-CNN modules (torchvision's, so that every engine can share them)
serve weights trained with either library, but the two libraries differ in many
small steps around the network. A model built for a detectron2 checkpoint carries
`Semantics.detectron2()` as its `semantics` attribute, and every engine that
reimplements a step (the fast GPU engine's fixed-shape graph, its kernels) reads
the step's rule from here instead of assuming torchvision's.

Plain data: no torch import, so configuration code and tests can use it anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Semantics:
    """The rules that differ between torchvision's and detectron2's Mask R-CNN inference."""

    name: str = "torchvision"
    # Resized size: torchvision floors h * scale; detectron2's ResizeShortestEdge rounds (int(x + 0.5)).
    resize_rounding: str = "floor"
    # detectron2 resizes a uint8 image with PIL's bilinear filter (antialiased when shrinking) and keeps
    # uint8 (rounded); a float image (its RGB-D input) with F.interpolate(bilinear, align_corners=False).
    resize_antialias_uint8: bool = False
    # RoI Align: detectron2's ROIAlignV2 is aligned=True with an adaptive sampling grid (ratio 0).
    roi_align_aligned: bool = False
    roi_sampling_ratio: int = 2
    # FPN level of a box: floor(4 + log2(sqrt(area) / 224) + 1e-6) in torchvision;
    # floor(4 + log2(sqrt(area) / 224 + 1e-8)) in detectron2.
    level_mapper: str = "torchvision"
    # Mask paste: torchvision expands the box by one mask pixel a side and resizes the padded mask to the
    # box's integer size; detectron2 samples the mask (grid_sample, align_corners=False, zero padding) at
    # every pixel centre, over [floor(x0) - 1, ceil(x1) + 1) on the CPU, and thresholds at >= 0.5.
    paste: str = "torchvision"
    # Detections with a side below this are dropped after the box head (torchvision 1e-2; detectron2 keeps
    # every non-empty box after rescaling to the input image).
    min_box_size: float = 1e-2
    # Proposals with a side below this are dropped in the RPN (torchvision 1e-3; detectron2 keeps > 0), where
    # the model's RPN carries no min_size of its own.
    rpn_min_size: float = 1e-3
    # How the two minimum sizes compare: torchvision's remove_small_boxes keeps sides >= the minimum,
    # detectron2's Boxes.nonempty keeps sides > it (so with 0, an empty box goes).
    min_size_strict: bool = False
    # What the RPN ranks proposals by, for its NMS and its post-NMS top-n: torchvision the objectness
    # probability (sigmoid, which ties in float32 where logits above ~17 differ) and drops those under
    # rpn.score_thresh; detectron2 the logit itself, with no score threshold.
    rpn_rank_by_logit: bool = False
    # Detections back to input pixels. torchvision: boxes scaled by w / rw, and min_box_size applied
    # before the class-wise NMS. detectron2 (detector_postprocess): boxes scaled (the same float32 ratio),
    # clipped to the input image, and boxes with a side not above min_box_size dropped after the NMS and
    # the top-k cut; an image's own score threshold keeps scores > it (torchvision's engine: >=).
    postprocess: str = "torchvision"

    @classmethod
    def detectron2(cls) -> "Semantics":
        return cls(name="detectron2", resize_rounding="half_up", resize_antialias_uint8=True,
                   roi_align_aligned=True, roi_sampling_ratio=0, level_mapper="detectron2",
                   paste="detectron2", min_box_size=0.0, rpn_min_size=0.0, min_size_strict=True,
                   rpn_rank_by_logit=True, postprocess="detectron2")

    def resized_size(self, h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
        """The size an h x w image is resized to before the network (shorter side min_size, longer <= max_size)."""
        if self.resize_rounding == "floor":
            scale = min(min_size / min(h, w), max_size / max(h, w))
            return int(math.floor(h * scale)), int(math.floor(w * scale))
        # detectron2's ResizeShortestEdge.get_output_shape, step for step (the order of the float
        # operations decides the rounding at .5).
        scale = min_size * 1.0 / min(h, w)
        if h < w:
            newh, neww = float(min_size), scale * w
        else:
            newh, neww = scale * h, float(min_size)
        if max(newh, neww) > max_size:
            scale = max_size * 1.0 / max(newh, neww)
            newh = newh * scale
            neww = neww * scale
        return int(newh + 0.5), int(neww + 0.5)


TORCHVISION = Semantics()
DETECTRON2 = Semantics.detectron2()
