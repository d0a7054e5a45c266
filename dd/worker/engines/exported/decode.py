"""The sample layout's outputs -> one Detections per image, in the input image's pixels.

num_detections, normalised boxes, scores, 0-based classes and 28 x 28 mask
probabilities (dd.models.graph_layout) become what the source model's engine
returns: boxes back from the canvas to input pixels (torchvision: times the
float32 ratios of the sizes; detectron2: scaled, clipped, empty ones dropped),
classes 1-based, the request's threshold applied with the source's comparison
(torchvision's engine keeps >=, detectron2 keeps >), and masks pasted by the
shared code of each rule: torchvision's paste straight to COCO RLE
(mask_rle.paste_and_encode), detectron2's grid-sample paste (its postprocess).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dd.models.detectron2.postprocess import paste_masks, rescale_boxes
from dd.models.graph_layout import BOXES, CLASSES, MASKS, NUM_DETECTIONS, SCORES
from dd.worker.engines.base import Detections
from dd.worker.engines.exported.canvas import Placed
from dd.worker.engines.masks import paste_and_encode


@dataclass
class SampleOutputs:
    """One batch of the graph's outputs as torch tensors (any device)."""

    num: torch.Tensor  # [B, 1] int32
    boxes: torch.Tensor  # [B, N, 4] normalised by the canvas
    scores: torch.Tensor  # [B, N]
    classes: torch.Tensor  # [B, N] int32, 0-based
    masks: torch.Tensor  # [B, N, M, M]

    @classmethod
    def from_named(cls, named: dict[str, object]) -> "SampleOutputs":
        def t(x: object) -> torch.Tensor:
            return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))

        missing = [k for k in (NUM_DETECTIONS, BOXES, SCORES, CLASSES, MASKS) if k not in named]
        if missing:
            raise ValueError(f"the graph's outputs lack {missing}; it has {sorted(named)} (export it again)")
        return cls(t(named[NUM_DETECTIONS]), t(named[BOXES]), t(named[SCORES]), t(named[CLASSES]), t(named[MASKS]))

    def check(self, batch: int) -> None:
        """Shapes as the layout documents them, or an error that says which differs."""
        b, n = self.scores.shape[:2]
        problems = []
        if b < batch:
            problems.append(f"batch {b} < {batch} images")
        if tuple(self.num.shape) != (b, 1):
            problems.append(f"{NUM_DETECTIONS} is {tuple(self.num.shape)}, not ({b}, 1)")
        if tuple(self.boxes.shape) != (b, n, 4):
            problems.append(f"{BOXES} is {tuple(self.boxes.shape)}, not ({b}, {n}, 4)")
        if tuple(self.classes.shape) != (b, n):
            problems.append(f"{CLASSES} is {tuple(self.classes.shape)}, not ({b}, {n})")
        if self.masks.dim() != 4 or tuple(self.masks.shape[:2]) != (b, n) or self.masks.shape[2] != self.masks.shape[3]:
            problems.append(f"{MASKS} is {tuple(self.masks.shape)}, not ({b}, {n}, M, M)")
        if problems:
            raise ValueError("the graph's outputs are not in the sample layout: " + "; ".join(problems))


def decode_image(out: SampleOutputs, i: int, placed: Placed, canvas: tuple[int, int], *, semantics: str,
                 score_threshold: float, mask_threshold: float, want_masks: bool) -> Detections:
    """Image i of a batch: its valid rows, back to its own pixels, filtered and pasted."""
    n = int(out.num[i, 0])
    n = max(0, min(n, out.scores.shape[1]))
    ch, cw = canvas
    scale = torch.tensor([cw, ch, cw, ch], dtype=torch.float32, device=out.boxes.device)
    boxes = out.boxes[i, :n].float() * scale  # canvas pixels = the resized image's
    scores = out.scores[i, :n].float()
    labels = out.classes[i, :n].long() + 1
    probs = out.masks[i, :n].float()
    h, w, rh, rw = placed.height, placed.width, placed.resized_h, placed.resized_w
    if semantics == "detectron2":
        boxes, keep = rescale_boxes(boxes, (rh, rw), (h, w))
        keep &= scores > score_threshold
    else:
        ratio = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device) / torch.tensor(
            [rw, rh, rw, rh], dtype=torch.float32, device=boxes.device)
        boxes = boxes * ratio
        keep = scores >= score_threshold
    boxes, scores, labels, probs = boxes[keep], scores[keep], labels[keep], probs[keep]
    masks, rle = None, None
    if want_masks:
        if semantics == "detectron2":
            masks = paste_masks(probs, boxes, h, w, mask_threshold).cpu().numpy()
        else:
            rle = paste_and_encode(probs, boxes.cpu().numpy(), h, w, mask_threshold)
    return Detections(boxes.cpu().numpy().astype(np.float32), scores.cpu().numpy().astype(np.float32),
                      labels.cpu().numpy().astype(np.int64), masks, rle)
