"""detectron2's detector_postprocess: boxes back to the input image, and its mask paste.

Boxes found on the resized image are scaled by (input width / resized width,
input height / resized height), clipped to the input image, and dropped when empty.
Each 28 x 28 (or M x M) mask probability map is pasted at the input resolution by
sampling it (grid_sample, align_corners=False, zero padding) at every pixel centre
of the region [floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1) clamped
to the image, as detectron2 does on the CPU, and thresholded with >= (0.5 by default).
Outside that region a mask is empty (there the sampled value is below half of the
mask's edge value, so never >= 0.5: the region only saves work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rescale_boxes(boxes: torch.Tensor, resized_hw: tuple[int, int], image_hw: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (N x 4, x0 y0 x1 y1) on the resized image -> on the input image, clipped; and the non-empty ones.

    Returns (boxes, keep): keep is a boolean mask of boxes with positive width and height.
    """
    (rh, rw), (h, w) = resized_hw, image_hw
    out = boxes.clone()
    out[:, 0::2] *= w / rw
    out[:, 1::2] *= h / rh
    x0 = out[:, 0].clamp(min=0, max=w)
    y0 = out[:, 1].clamp(min=0, max=h)
    x1 = out[:, 2].clamp(min=0, max=w)
    y1 = out[:, 3].clamp(min=0, max=h)
    out = torch.stack((x0, y0, x1, y1), dim=-1)
    keep = ((out[:, 2] - out[:, 0]) > 0) & ((out[:, 3] - out[:, 1]) > 0)
    return out, keep


def paste_mask(prob: torch.Tensor, box: torch.Tensor, h: int, w: int, threshold: float = 0.5
               ) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """One M x M probability map pasted into box: the boolean region and where it goes in the h x w image."""
    x0_int, y0_int = torch.clamp(box.floor()[:2] - 1, min=0).to(torch.int32).tolist()
    x1_int = int(torch.clamp(box[2].ceil() + 1, max=w).to(torch.int32))
    y1_int = int(torch.clamp(box[3].ceil() + 1, max=h).to(torch.int32))
    x0, y0, x1, y1 = box.view(1, 4).split(1, dim=1)
    img_y = torch.arange(y0_int, y1_int, device=prob.device, dtype=torch.float32) + 0.5
    img_x = torch.arange(x0_int, x1_int, device=prob.device, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    masks = prob.view(1, 1, *prob.shape[-2:]).float()
    sampled = F.grid_sample(masks, grid.to(masks.dtype), align_corners=False)[0, 0]
    return sampled >= threshold, (slice(y0_int, y1_int), slice(x0_int, x1_int))


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, h: int, w: int, threshold: float = 0.5) -> torch.Tensor:
    """N x M x M mask probabilities pasted into their boxes (input-image pixels): N x h x w bool."""
    out = torch.zeros((len(probs), h, w), dtype=torch.bool, device=probs.device)
    for i in range(len(probs)):
        region, where = paste_mask(probs[i], boxes[i].float(), h, w, threshold)
        out[(i,) + where] = region
    return out
