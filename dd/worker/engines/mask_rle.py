"""Mask pasting and COCO RLE for all instances at once, without full-image masks.

torchvision pastes each instance's 28x28 mask into a full-image tensor in a
Python loop (a dozen kernels per instance) and pycocotools then scans every
pixel of every full-image mask on the CPU. Here instances are resampled
together, in chunks of similar size, each chunk over a canvas as large as its
largest box, thresholded, and only the positions where a column of a mask
changes value leave the device.
COCO's column-major run lengths follow from those positions alone, so the
work and the bytes moved scale with the boxes' size, not the image's.

The sampling matches torchvision's paste_mask_in_image (pad by one pixel,
expand the box by (M+2)/M, bilinear resize with align_corners=False, integer
box corners), so the masks agree with the reference engine's; the resize is
done as two batched matrix products, since bilinear resizing is separable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util


def _expanded_int_boxes(boxes: torch.Tensor, mask_size: int, padding: int = 1) -> torch.Tensor:
    scale = float(mask_size + 2 * padding) / mask_size
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    out = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)
    return out.to(torch.int64)  # truncation toward zero, as torchvision's .to(int64)


def _interp_matrix(out_sizes: torch.Tensor, out_max: int, in_size: int) -> torch.Tensor:
    """Per instance, the (out_max x in_size) matrix of 1-D bilinear resizing to out_sizes[n] samples.

    Same arithmetic as F.interpolate(mode="bilinear", align_corners=False):
    source = (k + 0.5) * in / out - 0.5, clamped at 0, and the upper neighbour
    clamped at the last input pixel. Rows past an instance's own size are zero.
    """
    n = out_sizes.shape[0]
    dev = out_sizes.device
    k = torch.arange(out_max, device=dev, dtype=torch.float32)[None, :]
    scale = in_size / out_sizes.float()[:, None]
    src = ((k + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = src - i0.float()
    inside = (k < out_sizes[:, None]).float()
    mat = torch.zeros(n, out_max, in_size, device=dev)
    mat.scatter_add_(2, i0[..., None], ((1 - lam) * inside)[..., None])
    mat.scatter_add_(2, i1[..., None], (lam * inside)[..., None])
    return mat


def paste_transitions(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                      threshold: float = 0.5, max_elements: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """Where each pasted mask changes value, in COCO's column-major pixel order.

    masks: N x M x M probabilities; boxes: N x 4 in image pixels (float).
    Returns (instance index, flat index x*H + y) pairs as two int64 arrays,
    sorted by instance, then by position. Resizing is separable, so it is two
    small batched matrix products per chunk of instances. Instances are
    chunked in order of size, each chunk on a canvas as large as its own
    largest box and under `max_elements`: one large box does not make every
    small one pay for its canvas (a batch of 8 images with 100 instances each
    holds boxes of every size).
    """
    n, m = masks.shape[0], masks.shape[-1]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    padded = F.pad(masks.float(), (1, 1, 1, 1))  # N x (M+2) x (M+2)
    ib = _expanded_int_boxes(boxes.float(), m)
    w = (ib[:, 2] - ib[:, 0] + 1).clamp(min=1)
    h = (ib[:, 3] - ib[:, 1] + 1).clamp(min=1)
    # The rows and columns of each box that can still land in the image (an expanded box may
    # start above or left of it, so that is not simply the image's size). One sync for all.
    need = torch.stack([torch.minimum(h, height - ib[:, 1]), torch.minimum(w, width - ib[:, 0])], 1)
    need = need.clamp(min=1).cpu().numpy()
    order = np.argsort(need[:, 0] * need[:, 1], kind="stable")
    chunks, lo = [], 0
    while lo < n:
        hi, hm, wm = lo, 1, 1
        while hi < n:
            nh, nw = max(hm, int(need[order[hi], 0])), max(wm, int(need[order[hi], 1]))
            if hi > lo and (hi - lo + 1) * nh * nw > max_elements:
                break
            hi, hm, wm = hi + 1, nh, nw
        chunks.append((order[lo:hi], hm, wm))
        lo = hi
    insts, flats = [], []
    i = torch.arange(max(c[1] for c in chunks), device=masks.device)
    j = torch.arange(max(c[2] for c in chunks), device=masks.device)
    for members, hm, wm in chunks:
        sel = torch.from_numpy(members).to(masks.device)
        ry = _interp_matrix(h[sel], hm, m + 2)  # c x Hm x (M+2)
        rx = _interp_matrix(w[sel], wm, m + 2)  # c x Wm x (M+2)
        # Column-major directly: (Wm x M+2) @ (M+2 x M+2)^T-side gives columns outer, rows inner.
        cols = torch.bmm(torch.bmm(rx, padded[sel].transpose(1, 2)), ry.transpose(1, 2))  # c x Wm x Hm
        ys = ib[sel, 1, None] + i[None, :hm]
        xs = ib[sel, 0, None] + j[None, :wm]
        valid_y = (i[None, :hm] < h[sel, None]) & (ys >= 0) & (ys < height)
        valid_x = (j[None, :wm] < w[sel, None]) & (xs >= 0) & (xs < width)
        binary = (cols >= threshold) & valid_x[:, :, None] & valid_y[:, None, :]
        edges = F.pad(binary.to(torch.int8), (1, 1))  # a zero row above and below each column
        change = edges[..., 1:] != edges[..., :-1]  # value changes at local row k
        local, c, k = change.nonzero(as_tuple=True)
        inst = sel[local]
        flats.append((ib[inst, 0] + c) * height + (ib[inst, 1] + k))
        insts.append(inst)
    inst_all = torch.cat(insts).cpu().numpy()
    flat_all = torch.cat(flats).cpu().numpy()
    # Back to instance order (chunks went by size); within an instance positions are already ascending.
    back = np.argsort(inst_all, kind="stable")
    return inst_all[back], flat_all[back]


def rle_from_transitions(inst: np.ndarray, flat: np.ndarray, count: int, height: int, width: int) -> list[bytes]:
    """COCO compressed RLE strings from the change positions of `count` instances (no per-pixel work)."""
    if count == 0:
        return []
    total = height * width
    # A run that reaches the image's last pixel needs no closing mark (COCO ends on the last run).
    at_end = flat >= total
    if at_end.any():
        inst, flat = inst[~at_end], flat[~at_end]
    if len(flat) > 1:
        # A run ending at the bottom of one column and another starting at the top of the next
        # give the same position twice: they are one run, so both marks cancel.
        same = np.flatnonzero((flat[1:] == flat[:-1]) & (inst[1:] == inst[:-1]))
        if len(same):
            drop = np.zeros(len(flat), bool)
            drop[same] = True
            drop[same + 1] = True
            inst, flat = inst[~drop], flat[~drop]
    # Each instance's positions framed by 0 and H*W; run lengths are the differences inside a frame.
    bounds = np.searchsorted(inst, np.arange(count + 1))
    framed = np.insert(flat, np.repeat(bounds, [1] + [2] * (count - 1) + [1]),
                       np.tile(np.array([total, 0], dtype=flat.dtype), count + 1)[1:-1])
    runs = np.diff(framed).astype(np.uint32)
    # Drop the differences that straddle two frames (from one's H*W to the next one's 0).
    starts = bounds + 2 * np.arange(count + 1)  # frame starts in `framed`
    pieces = np.split(runs, starts[1:-1] - 1)
    objs = [{"size": [height, width], "counts": p if n == 0 else p[1:]} for n, p in enumerate(pieces)]
    return [r["counts"] for r in mask_util.frPyObjects(objs, height, width)]


def paste_and_encode(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                     threshold: float = 0.5) -> list[bytes]:
    inst, flat = paste_transitions(masks, boxes, height, width, threshold)
    return rle_from_transitions(inst, flat, masks.shape[0], height, width)
