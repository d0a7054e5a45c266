"""PIL's bilinear resize of a uint8 image, on the device, value for value.

detectron2 resizes a uint8 image (its ResizeShortestEdge, on every RGB input)
with PIL's `Image.resize(BILINEAR)`, and its network sees the uint8 result.
PIL's bilinear filter widens with the scale when it shrinks (antialiasing),
computes its weights in double precision, turns them into 22-bit fixed-point
integers, and resizes in two passes, each rounded and clipped to uint8.
torch's F.interpolate(mode="bilinear", antialias=True, align_corners=False)
on the 0-255 float image uses the same filter in float arithmetic, rounded
once. Measured on the CPU against PIL 13.0 (1280x720 -> 739x416, 640x480 ->
555x416, 320x240 -> 555x416, 1280x720 -> 1422x800, 131x97 -> 81x60; a
synthetic scene and uniform noise each), after rounding half up and clamping
to 0..255: never more than 1 grey level off, but in 15-20% of the pixel
values (25% on some other sizes). Rounding to uint8 between the two passes,
as PIL does, brings that to 0.1-2% (once 2 levels off, enlarging); what
remains is PIL's fixed-point weights. So PIL's own arithmetic is reproduced
here: the same double-precision weights and fixed-point integers, built on
the host once per (input, output) size, and each pass as a few gathers and
int32 multiply-adds on the device (the largest sum, 255 * 2**22 plus
rounding, fits int32 as it does in PIL), the passes in PIL's order.
tests/unit/engines/test_pil_resize.py finds it equal to PIL in every pixel, on those sizes
and on random ones. The weights follow the algorithm of Pillow's Resample.c
(precompute_coeffs, normalize_coeffs_8bpc), written here from its
description.

The order of the passes is Pillow 13's: vertical first where the height
loses more than twice as many pixels as the width, else horizontal first.
Older Pillow releases (11.0 and before) always went horizontal first; the two
agree wherever the rule says horizontal, which includes landscape camera
images resized to a shorter side (1280x720 -> 739x416: 304 rows lost, 541
columns).
"""

from __future__ import annotations

import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # PIL's fixed point for 8-bit images


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's bilinear filter taps for resizing an axis of in_size pixels to out_size:
    (index [out, T] int64, weight [out, T] int32 fixed-point), unused taps pointing at a valid
    pixel with weight 0."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"cannot resize {in_size} pixels to {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear (triangle) filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) truncates toward zero; the values below are clamped at 0 anyway.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    ss = 1.0 / filterscale
    weights = np.zeros((out_size, ksize), np.float64)
    total = np.zeros(out_size, np.float64)
    for x in range(ksize):  # summed tap by tap, in PIL's order
        t = np.abs((x + xmin - center + 0.5) * ss)
        w = np.where((x < xmax) & (t < 1.0), 1.0 - t, 0.0)
        weights[:, x] = w
        total += w
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    index = xmin[:, None] + np.arange(ksize)[None, :]
    used = np.arange(ksize)[None, :] < xmax[:, None]
    index = np.where(used, np.minimum(index, in_size - 1), xmin[:, None].clip(max=in_size - 1))
    fixed = np.where(used, fixed, 0).astype(np.int32)
    return index, fixed


class PilBilinear:
    """Resizes B x H x W x C uint8 images as PIL's Image.resize(BILINEAR) resizes each, on their device.

    The taps are made on the first call for a size (on the host, then copied): make that call
    outside a CUDA graph capture, which cannot copy constants to the device."""

    def __init__(self) -> None:
        self._taps: dict[tuple[int, int, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def _axis(self, in_size: int, out_size: int, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        key = (in_size, out_size, str(device))
        if key not in self._taps:
            index, weight = bilinear_taps(in_size, out_size)
            idx = torch.from_numpy(np.ascontiguousarray(index.T)).to(device)
            wt = torch.from_numpy(np.ascontiguousarray(weight.T)).to(device)
            self._taps[key] = (list(idx), list(wt))
        return self._taps[key]

    @staticmethod
    def _pass(x: torch.Tensor, dim: int, taps: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        """One axis: sum of the taps' pixels times their fixed-point weights, plus a half, shifted
        and clipped to 0..255, in int32 as PIL computes it."""
        shape = [1] * x.dim()
        acc = None
        for idx, wt in zip(*taps):
            shape[dim] = wt.shape[0]
            term = x.index_select(dim, idx).to(torch.int32) * wt.view(shape)
            acc = term if acc is None else acc.add_(term)
        assert acc is not None
        acc.add_(1 << (PRECISION_BITS - 1))
        return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)

    def __call__(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """x: B x H x W x C uint8 -> B x height x width x C uint8, the passes in PIL's order."""
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected B x H x W x C uint8 images, got {tuple(x.shape)} {x.dtype}")
        h, w = x.shape[1], x.shape[2]
        passes = [(2, w, width), (1, h, height)]
        if vertical_first(h, w, height, width):
            passes.reverse()
        for dim, size, out in passes:
            if size != out:
                x = self._pass(x, dim, self._axis(size, out, x.device))
        return x


def vertical_first(h: int, w: int, height: int, width: int) -> bool:
    """Whether PIL resizes h x w to height x width vertically first: where the height loses more than
    twice as many pixels as the width (Pillow 13's rule, which saves work; the passes round to uint8
    in between, so the order shows in the result)."""
    return h - height > 0 and h - height > (w - width) * 2
