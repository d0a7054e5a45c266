"""COCO compressed RLE of full-image boolean masks on the host (pycocotools), without torch.

The response encoders use it for engines that return full-image masks (torchvision, null,
exported graphs); they must import without torch, which a worker of the null engine, and
.ci/run's lowest-pins environment, do not have. The GPU paste + RLE is in masks.py.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_util


def rle_encode(masks: np.ndarray) -> list[bytes]:
    """COCO compressed RLE of N x H x W boolean masks, one bytes string each.

    pycocotools wants H x W x N in Fortran order; an N x W x H C-ordered array
    is exactly that memory layout, so one transposing copy is all it costs.
    """
    if len(masks) == 0:
        return []
    fortran = np.ascontiguousarray(masks.transpose(0, 2, 1), dtype=np.uint8).transpose(2, 1, 0)
    return [r["counts"] for r in mask_util.encode(fortran)]
