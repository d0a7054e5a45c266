"""How far one engine's answers are from a reference engine's: the numbers the parity bounds are stated in.

Greedy matching in the reference's score order: same class, box IoU >= 0.9. Reported: the matched
fraction of the reference's detections, the largest box corner deviation (px), the largest score
deviation and the smallest mask IoU of matched pairs, and the reference detections scoring at
least `confident` that found no twin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_util

from dd.worker.engines.masks import rle_encode
from dd.worker.engines.base import Detections


@dataclass
class Parity:
    reference: int = 0
    other: int = 0
    matched: int = 0
    box_dev: list[float] = field(default_factory=list)
    score_dev: list[float] = field(default_factory=list)
    mask_iou: list[float] = field(default_factory=list)
    confident_unmatched: int = 0

    @property
    def matched_fraction(self) -> float:
        return self.matched / self.reference if self.reference else 1.0

    def summary(self) -> dict[str, float]:
        return {"reference": self.reference, "other": self.other, "matched_fraction": round(self.matched_fraction, 4),
                "max_box_dev_px": max(self.box_dev, default=0.0), "max_score_dev": max(self.score_dev, default=0.0),
                "min_mask_iou": min(self.mask_iou, default=1.0),
                "mean_mask_iou": float(np.mean(self.mask_iou)) if self.mask_iou else 1.0,
                "confident_unmatched": self.confident_unmatched}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def add(acc: Parity, ref: Detections, other: Detections, h: int, w: int, confident: float) -> Parity:
    ref_rle = ref.rle if ref.rle is not None else rle_encode(ref.masks)
    oth_rle = other.rle if other.rle is not None else rle_encode(other.masks)
    acc.reference += len(ref.scores)
    acc.other += len(other.scores)
    ious = _iou(ref.boxes, other.boxes) if len(ref.scores) and len(other.scores) else \
        np.zeros((len(ref.scores), len(other.scores)))
    used: set[int] = set()
    for j in np.argsort(-ref.scores, kind="stable"):
        twin = None
        for i in np.argsort(-ious[j], kind="stable"):
            if ious[j, i] < 0.9:
                break
            if i not in used and other.labels[i] == ref.labels[j]:
                twin = i
                break
        if twin is None:
            acc.confident_unmatched += int(ref.scores[j] >= confident)
            continue
        used.add(twin)
        acc.matched += 1
        acc.box_dev.append(float(np.abs(other.boxes[twin] - ref.boxes[j]).max()))
        acc.score_dev.append(float(abs(other.scores[twin] - ref.scores[j])))
        a = {"size": [h, w], "counts": oth_rle[twin]}
        b = {"size": [h, w], "counts": ref_rle[j]}
        both_empty = mask_util.area(a) == 0 and mask_util.area(b) == 0  # equal, though COCO's IoU says 0
        acc.mask_iou.append(1.0 if both_empty else float(mask_util.iou([a], [b], [0])[0, 0]))
    return acc
