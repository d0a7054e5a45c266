"""The matrix greedy NMS iterates on, as one Triton kernel instead of a dozen broadcast passes.

nms_fixed (fixed_shapes.py) needs, for G groups of K boxes, the K x K matrix
"box j is earlier than box i, valid, of the same class, and overlaps it by
more than the threshold". Written with torch operations that is about fourteen
passes over [G, K, K] float32 temporaries (corners, widths, intersection,
union, IoU, comparisons): in the profile of the one-graph engine they were the
largest single item, 1 ms of GPU time per image (5 levels x 1000 x 1000 RPN
boxes). Here one kernel reads the boxes once and writes the float16 matrix once.

The IoU is computed with torchvision's nms arithmetic (max/min corners,
widths clamped at 0, intersection over area + area - intersection, IEEE
division, no fused multiply-adds), so the matrix equals the torch version's
bit for bit; tests/unit/engines/test_suppression.py checks that in Triton's interpreter.
Without Triton, or where it cannot compile, callers use the torch version.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None

BLOCK = 64

if triton is not None:

    @triton.jit
    def _suppression_kernel(boxes_ptr, valid_ptr, labels_ptr, out_ptr, k, threshold,
                            HAS_LABELS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr):
        g = tl.program_id(2).to(tl.int64)  # g * k * k passes 2**31 at a few hundred groups
        j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)  # earlier boxes (rows)
        i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # later boxes (columns)
        in_j = j < k
        in_i = i < k
        base = boxes_ptr + g * k * 4
        x1j = tl.load(base + j * 4 + 0, mask=in_j, other=0.0)
        y1j = tl.load(base + j * 4 + 1, mask=in_j, other=0.0)
        x2j = tl.load(base + j * 4 + 2, mask=in_j, other=0.0)
        y2j = tl.load(base + j * 4 + 3, mask=in_j, other=0.0)
        x1i = tl.load(base + i * 4 + 0, mask=in_i, other=0.0)
        y1i = tl.load(base + i * 4 + 1, mask=in_i, other=0.0)
        x2i = tl.load(base + i * 4 + 2, mask=in_i, other=0.0)
        y2i = tl.load(base + i * 4 + 3, mask=in_i, other=0.0)
        area_j = (x2j - x1j) * (y2j - y1j)
        area_i = (x2i - x1i) * (y2i - y1i)
        w = tl.maximum(tl.minimum(x2j[:, None], x2i[None, :]) - tl.maximum(x1j[:, None], x1i[None, :]), 0.0)
        h = tl.maximum(tl.minimum(y2j[:, None], y2i[None, :]) - tl.maximum(y1j[:, None], y1i[None, :]), 0.0)
        inter = w * h
        iou = tl.math.div_rn(inter, area_j[:, None] + area_i[None, :] - inter)
        valid_j = tl.load(valid_ptr + g * k + j, mask=in_j, other=0) != 0
        hit = (iou > threshold) & (j[:, None] < i[None, :]) & valid_j[:, None]
        if HAS_LABELS:
            lab_j = tl.load(labels_ptr + g * k + j, mask=in_j, other=0)
            lab_i = tl.load(labels_ptr + g * k + i, mask=in_i, other=0)
            hit = hit & (lab_j[:, None] == lab_i[None, :])
        tl.store(out_ptr + g * k * k + j[:, None] * k + i[None, :], hit.to(tl.float16),
                 mask=in_j[:, None] & in_i[None, :])


def available() -> bool:
    return triton is not None


def suppression_matrix(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float,
                       labels: torch.Tensor | None = None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """[G, K, 4] boxes (descending score within each group), [G, K] valid, optional [G, K] labels ->
    [G, K, K] of 0/1 in `dtype`: entry [g, j, i] is 1 when box j precedes box i, is valid, has
    i's label and overlaps it by more than iou_threshold (the torch version is in nms_fixed)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    g, k = boxes.shape[0], boxes.shape[1]
    boxes = boxes.float().contiguous()
    valid = valid.to(torch.int8).contiguous()
    has_labels = labels is not None
    lab = labels.to(torch.int32).contiguous() if labels is not None else valid
    out = torch.empty(g, k, k, dtype=torch.float16, device=boxes.device)
    grid = (triton.cdiv(k, BLOCK), triton.cdiv(k, BLOCK), g)
    # No fused multiply-adds: the areas and the union must round as torch's separate operations do.
    _suppression_kernel[grid](boxes, valid, lab, out, k, float(iou_threshold), HAS_LABELS=has_labels,
                              BLOCK_J=BLOCK, BLOCK_I=BLOCK, enable_fp_fusion=False)
    return out if dtype == torch.float16 else out.to(dtype)
