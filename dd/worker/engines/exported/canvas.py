"""Images -> the exported graph's input: resized as the source model resizes, normalised, on a fixed canvas.

An exported graph takes a fixed H x W canvas (TensorRT engines are fixed-shape;
the anchors are constants of the canvas). Each image is resized by the source
model's rule (shorter side MIN_SIZE, longer at most MAX_SIZE; torchvision's floor or
detectron2's half-up rounding and filters), normalised, and placed at the top left
of a zero canvas, as both libraries pad. An image whose resized size does not fit
the canvas (a portrait image on a landscape canvas) is resized to fit instead (the
same rule with the canvas as a further cap), which is the one case where the answers
differ from the source model's; the engine logs it once per input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dd.models.detectron2.preprocess import resize_float, resize_uint8, rgbd_image
from dd.models.graph_layout import GraphContract
from dd.models.semantics import DETECTRON2, TORCHVISION
from dd.worker.engines.base import EngineInput, depth_to_metres


@dataclass
class Placed:
    """Where one image went: its input size and its resized size on the canvas."""

    height: int
    width: int
    resized_h: int
    resized_w: int
    fitted: bool  # resized smaller than the model's rule to fit the canvas


def resized_size(contract: GraphContract, h: int, w: int, min_size: int, max_size: int) -> tuple[int, int, bool]:
    """The model's resized size of an h x w image, or the largest that fits the canvas by the same rule."""
    sem = DETECTRON2 if contract.semantics == "detectron2" else TORCHVISION
    rh, rw = sem.resized_size(h, w, min_size, max_size)
    if rh <= contract.height and rw <= contract.width:
        return rh, rw, False
    scale = min(contract.height / h, contract.width / w)
    rh, rw = min(contract.height, int(math.floor(h * scale))), min(contract.width, int(math.floor(w * scale)))
    return max(rh, 1), max(rw, 1), True


class CanvasBuilder:
    """Builds the [B, C, H, W] input and the [B, 2] image sizes for a batch, on `device`."""

    def __init__(self, contract: GraphContract, *, input_kind: str, min_size: int, max_size: int,
                 depth_unit_m: float, depth_fill_m: float | None, device: torch.device | str = "cpu") -> None:
        self.c = contract
        self.kind = input_kind
        self.min_size, self.max_size = min_size, max_size
        self.depth_unit_m = depth_unit_m
        self.fill = depth_fill_m
        self.device = torch.device(device)
        self.mean = torch.tensor(contract.mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.tensor(contract.std, dtype=torch.float32, device=self.device).view(-1, 1, 1)

    def _torchvision(self, item: EngineInput, rh: int, rw: int) -> torch.Tensor:
        """GeneralizedRCNNTransform: x / 255 (and depth in metres, missing filled), normalised, then bilinear."""
        x = torch.from_numpy(item.color).to(self.device).permute(2, 0, 1).float() * self.c.input_scale
        if self.kind == "rgbd":
            if item.depth is None:
                raise ValueError("RGB-D model needs depth")
            d = torch.from_numpy(depth_to_metres(item.depth, self.depth_unit_m)).to(self.device)
            if self.fill is not None:
                d = torch.where(d > 0, d, torch.full_like(d, self.fill))
            x = torch.cat([x, d[None]], 0)
        x = (x - self.mean) / self.std
        return F.interpolate(x[None], size=(rh, rw), mode="bilinear", align_corners=False)[0]

    def _detectron2(self, item: EngineInput, rh: int, rw: int) -> torch.Tensor:
        """DefaultPredictor: uint8 RGB through PIL's bilinear, RGB-D as float through F.interpolate; then normalised."""
        h, w = item.color.shape[:2]
        if self.kind == "rgbd":
            if item.depth is None:
                raise ValueError("RGB-D model needs depth")
            x = resize_float(rgbd_image(item.color, item.depth, self.depth_unit_m, self.fill), rh, rw)
        else:
            img = resize_uint8(item.color, rh, rw) if (rh, rw) != (h, w) else item.color
            x = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1))
        return (x.to(self.device) * self.c.input_scale - self.mean) / self.std

    def build(self, items: list[EngineInput], batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   list[Placed]]:
        """items placed on `batch` canvases (len(items) by default; spare canvases stay empty, size 0)."""
        n = batch or len(items)
        out = torch.zeros((n, self.c.channels, self.c.height, self.c.width), dtype=torch.float32, device=self.device)
        sizes = torch.zeros((n, 2), dtype=torch.float32)
        placed = []
        for i, item in enumerate(items):
            h, w = item.color.shape[:2]
            rh, rw, fitted = resized_size(self.c, h, w, self.min_size, self.max_size)
            x = self._detectron2(item, rh, rw) if self.c.semantics == "detectron2" else self._torchvision(item, rh, rw)
            out[i, :, :rh, :rw] = x
            sizes[i, 0], sizes[i, 1] = rh, rw
            placed.append(Placed(h, w, rh, rw, fitted))
        return out, sizes.to(self.device), placed
