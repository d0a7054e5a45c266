"""The filtered rows of a 16-bit grayscale PNG, and their pixels reconstructed on the CPU with numpy.

A 16-bit depth PNG costs about 10 ms to decode on one core, most of it zlib (3 ms with ISA-L)
and the per-row filters PNG applies before compressing (libpng's scalar loops). The frontend
inflates the image (dd/frontend/png_depth.py) and, where the model's workers reconstruct rows on
their GPU, puts the inflated rows into the ring as they are: H rows of one filter-type byte then
2 x W big-endian bytes. Only rows filtered with None, Sub or Up go that way (SENT_FILTERS): those
three are prefix sums, which a GPU computes in a few kernels (dd/worker/engines/png_unfilter.py);
Average and Paeth depend on the row being reconstructed, and such images go as pixels.

This module is what both sides share: the type an engine receives (PngRows), and the numpy
reconstruction the worker's core uses for an engine that does not reconstruct rows itself, so
that any worker serves a request whose depth arrived as rows. It imports numpy only.

The reconstruction, from the PNG specification (section 9, filter method 0), per byte lane of
the 2-byte samples, all arithmetic modulo 256:
  None: Raw(x) = Filt(x)
  Sub:  Raw(x) = Filt(x) + Raw(x - 1 pixel)         -> a prefix sum along the row
  Up:   Raw(x) = Filt(x) + Prior(x)                  -> a prefix sum down the rows, restarted at
                                                       every row that is not Up (the first row's
                                                       prior is zero)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NONE, SUB, UP, AVERAGE, PAETH = 0, 1, 2, 3, 4
SENT_FILTERS = frozenset({NONE, SUB, UP})  # the row filters that may travel as rows
ENCODING = "png_rows"  # the ring's name for them (ArrayRef.encoding of the depth)


def rows_nbytes(height: int, width: int) -> int:
    """Bytes of the filtered rows of a height x width 16-bit grayscale image."""
    return height * (1 + 2 * width)


@dataclass
class PngRows:
    """A depth image still as the filtered rows of its 16-bit grayscale PNG: `data` is height x (1 + 2 x
    width) uint8 (a view of the ring slot, no copy), each row a filter type (None, Sub or Up) and its
    big-endian samples. It reconstructs to height x width uint16 (`dtype`, as a decoded depth has)."""

    data: np.ndarray
    height: int
    width: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width


class RowsError(ValueError):
    """The rows are not what a PngRows must hold (a filter type other than None, Sub or Up, or a size
    that is not height x (1 + 2 x width)); says which."""


def unfilter(rows: np.ndarray, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """height x width uint16 (native byte order) from filtered rows (None, Sub and Up only); into `out`
    when given. RowsError for anything else."""
    if rows.dtype != np.uint8 or rows.shape != (height, 1 + 2 * width):
        raise RowsError(f"depth rows must be {height} x {1 + 2 * width} bytes for a {width}x{height} image, "
                        f"got {list(rows.shape)} {rows.dtype}")
    filters = rows[:, 0]
    bad = np.flatnonzero(~np.isin(filters, (NONE, SUB, UP)))
    if bad.size:
        raise RowsError(f"depth row {int(bad[0])} has PNG filter type {int(filters[bad[0]])}; rows may only be "
                        "None (0), Sub (1) or Up (2)")
    samples = rows[:, 1:].reshape(height, width, 2)
    sub = np.flatnonzero(filters == SUB)
    if sub.size == height:
        recon = np.cumsum(samples, axis=1, dtype=np.uint8)
    else:
        recon = samples.copy()
        if sub.size:
            recon[sub] = np.cumsum(samples[sub], axis=1, dtype=np.uint8)
    up = filters == UP
    up[0] = False  # the first row's prior row is zero: Up is None there
    if up.any():
        # Runs of Up rows add the row above them: a prefix sum down the rows (mod 256, uint8 wraps),
        # minus the sum before each run's first row (its segment start).
        total = np.cumsum(recon, axis=0, dtype=np.uint8)
        start = np.maximum.accumulate(np.where(up, 0, np.arange(height)))
        before = np.zeros_like(total)
        before[1:] = total[:-1]
        recon = total - before[start]
    if out is None:
        out = np.empty((height, width), np.uint16)
    np.copyto(out, recon.view(">u2")[..., 0])
    return out
