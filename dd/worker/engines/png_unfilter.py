"""16-bit PNG rows (dd.png_rows.PngRows) reconstructed to depth pixels with torch ops, on the engine's device.

The frontend inflated the PNG and sent its filtered rows (None, Sub or Up only); here they
become H x W uint16 in a handful of kernels instead of libpng's scalar loops on a host core:
per byte lane (PNG samples are big-endian byte pairs, filtered byte by byte, modulo 256)

  1. Sub rows: a prefix sum along the row; None and Up rows: as they are;
  2. a prefix sum down the rows of those row-wise results, restarted at each row that is not Up
     (a segmented prefix sum: the total minus the total before the segment's first row);
  3. the two lanes joined into native uint16.

Prefix sums run in int32 (exact: at most 255 x max(H, W) per lane) and are reduced modulo 256
afterwards. The same function runs on CPU and CUDA tensors; tests check it against OpenCV's
decoder. torch is imported here only: the worker's core imports dd.png_rows (numpy) instead.
"""

from __future__ import annotations

import numpy as np
import torch

from dd.png_rows import SUB, UP, PngRows


def unfilter_rows(rows: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """H x W uint16 pixels from H x (1 + 2 x width) uint8 filtered rows (filters None, Sub or Up; any other
    filter byte is read as None: the frontend sends no other), on rows' device; into `out` when given."""
    height = rows.shape[0]
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != 1 + 2 * width:
        raise ValueError(f"rows must be H x {1 + 2 * width} uint8 for width {width}, got {list(rows.shape)} "
                         f"{rows.dtype}")
    filters = rows[:, 0].long()
    samples = rows[:, 1:].reshape(height, width, 2).int()
    along = torch.where((filters == SUB)[:, None, None], samples.cumsum(1, dtype=torch.int32), samples) & 0xFF
    down = along.cumsum(0, dtype=torch.int32)
    index = torch.arange(height, device=rows.device)
    is_up = (filters == UP) & (index > 0)  # the first row's prior is zero: Up is None there
    start = torch.where(is_up, torch.zeros_like(index), index).cummax(0).values
    before = torch.cat([torch.zeros_like(down[:1]), down[:-1]])
    recon = (down - before[start]) & 0xFF
    pixels = ((recon[..., 0] << 8) | recon[..., 1]).to(torch.uint16)
    if out is None:
        return pixels
    return out.copy_(pixels)


def rows_to_device(depth: PngRows, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """A PngRows' pixels on `device` (H x W uint16), into `out` when given: its rows are copied there as they
    are (non-blocking from page-locked memory) and reconstructed there."""
    rows = torch.from_numpy(depth.data).to(device, non_blocking=True)
    return unfilter_rows(rows, depth.width, out)


def depth_dtype(depth: np.ndarray | PngRows) -> torch.dtype:
    """The torch dtype a depth input has on the device: its array's, or uint16 for PNG rows."""
    if isinstance(depth, PngRows):
        return torch.uint16
    return torch.from_numpy(depth[:1, :1]).dtype


def host_array(depth: np.ndarray | PngRows) -> np.ndarray:
    """The host memory a depth input is copied from (for page-locking it): its array, or its rows."""
    return depth.data if isinstance(depth, PngRows) else depth


def depth_to_device(depth: np.ndarray | PngRows, device: torch.device, out: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """A depth input on `device` as pixels (non-blocking from page-locked memory), into `out` when given:
    an array is copied as it is, PNG rows are copied and reconstructed there."""
    if isinstance(depth, PngRows):
        return rows_to_device(depth, device, out)
    if out is None:
        return torch.from_numpy(depth).to(device, non_blocking=True)
    return out.copy_(torch.from_numpy(depth), non_blocking=True)
