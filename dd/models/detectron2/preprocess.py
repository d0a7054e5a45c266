"""detectron2's DefaultPredictor input path: resize, normalise, pad, step for step.

DefaultPredictor resizes with ResizeShortestEdge (sizes rounded half up, see
dd.models.semantics.Semantics.resized_size) through ResizeTransform, which treats
the two kinds of image differently:

- a uint8 image (RGB models) goes through PIL's BILINEAR resize (antialiased when
  shrinking) and stays uint8, so the network sees the rounded pixels;
- a float image (the RGB-D models' 4-channel input) goes through
  F.interpolate(bilinear, align_corners=False), no antialiasing, in float32.

Then GeneralizedRCNN normalises ((x - PIXEL_MEAN) / PIXEL_STD, 0-255 for color,
metres for depth) and pads the batch with zeros to a multiple of 32. The input
channels here are R, G, B (then D): convert.py reversed a BGR model's stem so that
the arithmetic is the same as detectron2's on B, G, R (then D).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dd.models.semantics import DETECTRON2

SIZE_DIVISIBILITY = 32  # the FPN's coarsest input stride (res5); detectron2 pads to it


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """ResizeShortestEdge.get_output_shape: the shorter side to min_size, the longer at most max_size."""
    return DETECTRON2.resized_size(h, w, min_size, max_size)


def resize_uint8(image: np.ndarray, rh: int, rw: int) -> np.ndarray:
    """H x W x 3 uint8 -> rh x rw x 3 uint8 with PIL's bilinear filter, as ResizeTransform on a uint8 image."""
    return np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))


def resize_float(image: np.ndarray, rh: int, rw: int) -> torch.Tensor:
    """H x W x C float32 -> C x rh x rw with F.interpolate(bilinear, align_corners=False), as ResizeTransform on
    a float image (the same memory layout too: an H x W x C array viewed as 1 x C x H x W, channels last)."""
    t = torch.from_numpy(np.ascontiguousarray(image))
    h, w, c = t.shape
    x = t.view(h, w, 1, c).permute(2, 3, 0, 1)
    if (h, w) != (rh, rw):
        x = F.interpolate(x, (rh, rw), mode="bilinear", align_corners=False)
    return x[0]


def rgbd_image(color: np.ndarray, depth: np.ndarray, depth_unit_m: float, depth_fill_m: float | None) -> np.ndarray:
    """The 4-channel float32 image an RGB-D detectron2 model takes: R, G, B as 0-255 floats, then depth in metres.

    uint16 depth is metres = value x depth_unit_m (in float32); float depth is metres as given. Missing
    depth (0) stays 0 unless depth_fill_m is set.
    """
    if depth.shape != color.shape[:2]:
        raise ValueError(f"depth is {depth.shape[1]}x{depth.shape[0]} but color is "
                         f"{color.shape[1]}x{color.shape[0]}; they must be the same size")
    if np.issubdtype(depth.dtype, np.integer):
        d = depth.astype(np.float32) * np.float32(depth_unit_m)
    else:
        d = depth.astype(np.float32, copy=False)
    if depth_fill_m is not None:
        d = np.where(d > 0, d, np.float32(depth_fill_m)).astype(np.float32)
    out = np.empty((*color.shape[:2], 4), np.float32)
    out[..., :3] = color
    out[..., 3] = d
    return out


def network_image(color: np.ndarray, depth: np.ndarray | None, min_size: int, max_size: int, *,
                  depth_unit_m: float = 0.001, depth_fill_m: float | None = None) -> torch.Tensor:
    """One image resized as DefaultPredictor resizes it: C x rh x rw float32 (not yet normalised), R, G, B (, D)."""
    h, w = color.shape[:2]
    rh, rw = resized_size(h, w, min_size, max_size)
    if depth is None:
        resized = resize_uint8(color, rh, rw) if (rh, rw) != (h, w) else color
        return torch.from_numpy(resized.astype(np.float32).transpose(2, 0, 1))
    return resize_float(rgbd_image(color, depth, depth_unit_m, depth_fill_m), rh, rw)


def normalise_and_pad(images: Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float],
                      divisibility: int = SIZE_DIVISIBILITY, device: torch.device | str = "cpu") -> torch.Tensor:
    """(x - mean) / std per channel, then zero padding to a common size divisible by `divisibility`:
    GeneralizedRCNN.preprocess_image with ImageList.from_tensors. Returns N x C x Hp x Wp float32."""
    m = torch.tensor(list(mean), dtype=torch.float32, device=device).view(-1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32, device=device).view(-1, 1, 1)
    normed = [(img.to(device) - m) / s for img in images]
    hp = -(-max(x.shape[1] for x in normed) // divisibility) * divisibility
    wp = -(-max(x.shape[2] for x in normed) // divisibility) * divisibility
    out = torch.zeros((len(normed), normed[0].shape[0], hp, wp), dtype=torch.float32, device=device)
    for i, x in enumerate(normed):
        out[i, :, : x.shape[1], : x.shape[2]].copy_(x)
    return out
