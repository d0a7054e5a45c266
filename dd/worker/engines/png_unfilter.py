"""16-bit PNG rows (dd.png_rows.PngRows) reconstructed to depth pixels with torch ops, on the engine's device.

The frontend inflated the PNG and sent its filtered rows (None, Sub or Up only); here they
become H x W uint16 in a handful of kernels instead of libpng's scalar loops on a host core:
per byte lane (PNG samples are big-endian byte pairs, filtered byte by byte, modulo 256)

  1. Sub rows: a prefix sum along the row; None and Up rows: as they are;
  2. a prefix sum down the rows of those row-wise results, restarted at each row that is not Up
     (a segmented prefix sum: the total minus the total before the segment's first row);
  3. the two lanes joined into native uint16.

Everything runs in uint8, whose wrap-around is PNG's modulo 256 (a prefix sum's difference too),
so each pass reads and writes the rows' size, and the lanes become uint16 by a byte swap and a view.
A batch of same-size images runs in one set of kernels. The same function runs on CPU and CUDA
tensors; tests check it against OpenCV's decoder. torch is imported here only: the worker's core
imports dd.png_rows (numpy) instead.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from dd.png_rows import SUB, UP, PngRows


def unfilter_rows(rows: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """... x H x W uint16 pixels (native byte order) from ... x H x (1 + 2 x width) uint8 filtered rows (filters
    None, Sub or Up; any other filter byte is read as None: the frontend sends no other), on rows' device;
    leading dimensions are a batch of images of one size. Into `out` when given. No host synchronisation."""
    if rows.dtype != torch.uint8 or rows.dim() < 2 or rows.shape[-1] != 1 + 2 * width:
        raise ValueError(f"rows must be [..., H, {1 + 2 * width}] uint8 for width {width}, got {list(rows.shape)} "
                         f"{rows.dtype}")
    height = rows.shape[-2]
    filters = rows[..., 0]  # ... x H
    samples = rows[..., 1:].unflatten(-1, (width, 2))  # ... x H x W x 2 (big-endian byte lanes)
    along = torch.where((filters == SUB)[..., None, None], samples.cumsum(-2, dtype=torch.uint8), samples)
    down = along.cumsum(-3, dtype=torch.uint8)
    index = torch.arange(height, device=rows.device)
    is_up = (filters == UP) & (index > 0)  # the first row's prior is zero: Up is None there
    start = torch.where(is_up, torch.zeros_like(index), index).cummax(-1).values  # each row's segment start
    before = torch.cat([torch.zeros_like(down.narrow(-3, 0, 1)), down.narrow(-3, 0, height - 1)], dim=-3)
    recon = down - before.gather(-3, start[..., None, None].expand_as(before))
    if sys.byteorder == "little":
        recon = recon.flip(-1)
    pixels = recon.contiguous().view(torch.uint16).squeeze(-1)
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


def depths_into(depths: list[np.ndarray | PngRows], out: torch.Tensor) -> None:
    """Writes a batch's depth inputs into out[0], out[1], ... (a device tensor, e.g. a CUDA graph's static
    input): arrays are copied as they are; PNG rows (all of one size, as a batch's images are) are copied
    into one device buffer and reconstructed in one call, whatever their number."""
    rows = [i for i, d in enumerate(depths) if isinstance(d, PngRows)]
    for i, d in enumerate(depths):
        if not isinstance(d, PngRows):
            out[i].copy_(torch.from_numpy(d), non_blocking=True)
    if not rows:
        return
    first: PngRows = depths[rows[0]]  # type: ignore[assignment]
    staged = torch.empty((len(rows), *first.data.shape), dtype=torch.uint8, device=out.device)
    for j, i in enumerate(rows):
        staged[j].copy_(torch.from_numpy(depths[i].data), non_blocking=True)  # type: ignore[union-attr]
    pixels = unfilter_rows(staged, first.width)
    if rows == list(range(len(rows))):
        out[:len(rows)].copy_(pixels)
        return
    for j, i in enumerate(rows):  # a batch of rows and arrays: device copies, no index tensor to upload
        out[i].copy_(pixels[j])
