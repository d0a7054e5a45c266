"""Size buckets ("canvases") for the fast engine's graphs: which padded network inputs get a graph, and
which one a batch runs on.

A CUDA graph has fixed shapes. Keyed by the input size, every new camera resolution meant a capture in
service (or an op-by-op run meanwhile, at shapes cuDNN had never planned). But the network never sees
the input size: it sees the resized image, zero-padded to multiples of 32 (both torchvision and
detectron2 pad a batch to its largest image that way). So the graphs are keyed by that padded network
input, the canvas, and an image whose padded resized size fits a canvas runs on it, the rest of the
canvas zero, as it would be batched with a larger image in either library. The resize rule bounds
every image: the shorter side by min_size, the longer by max_size, so two canvases hold every input
size (landscape and portrait); the warm-up sizes' own canvases are kept too, so that the sizes a
deployment names get exactly the answers of their own size.

Plain numbers (no torch): the choice is unit-tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

Canvas = tuple[int, int]  # (height, width) of the padded network input, multiples of `divisible`
Resize = Callable[[int, int], tuple[int, int]]

# Per image, beside the canvas (float32, one row each): resized height and width; the ratio back to
# input pixels (x, y, x, y); input height and width (detectron2 clips boxes to them).
ROW = 8


def padded(n: int, divisible: int = 32) -> int:
    return int(math.ceil(n / divisible) * divisible)


def canvas_of(resized: tuple[int, int], divisible: int = 32) -> Canvas:
    """The exact canvas of one image: its resized size padded to multiples of `divisible`."""
    return padded(resized[0], divisible), padded(resized[1], divisible)


def largest_canvases(min_size: int, max_size: int, divisible: int = 32) -> list[Canvas]:
    """The canvases that hold every image the resize rule can make: the shorter side is at most
    min_size and the longer at most max_size (torchvision's and detectron2's rule alike), so
    landscape padded(min) x padded(max) and portrait padded(max) x padded(min)."""
    lo, hi = padded(min_size, divisible), padded(max_size, divisible)
    return [(lo, hi)] if lo == hi else [(lo, hi), (hi, lo)]


def default_canvases(warmup_sizes: Iterable[Sequence[int]], resize: Resize, min_size: int, max_size: int,
                     divisible: int = 32) -> list[Canvas]:
    """The warm-up sizes' own canvases, then the largest ones (without repeats)."""
    out: list[Canvas] = []
    for h, w in warmup_sizes:
        c = canvas_of(resize(int(h), int(w)), divisible)
        if c not in out:
            out.append(c)
    for c in largest_canvases(min_size, max_size, divisible):
        if c not in out:
            out.append(c)
    return out


def parse_canvases(value: object, divisible: int = 32) -> list[Canvas]:
    """ENGINE_OPTIONS canvases: [[H, W], ...] positive integers, each rounded up to a multiple of
    `divisible` (the network pads to that anyway)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"ENGINE_OPTIONS 'canvases' must be a non-empty list of [height, width] pairs, got {value!r}")
    out: list[Canvas] = []
    for pair in value:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
            raise ValueError(f"ENGINE_OPTIONS 'canvases': each entry is [height, width] of positive integers "
                             f"(padded network input sizes, e.g. [800, 1344]), not {pair!r}")
        c = (padded(pair[0], divisible), padded(pair[1], divisible))
        if c not in out:
            out.append(c)
    return out


def holds(canvas: Canvas, need: Canvas) -> bool:
    return canvas[0] >= need[0] and canvas[1] >= need[1]


def pick_canvas(needs: Iterable[Canvas], canvases: Sequence[Canvas]) -> Canvas | None:
    """The smallest canvas (by area, then height) holding every one of `needs` (exact canvases of the
    images of one batch); None where none does."""
    needs = list(needs)
    fits = [c for c in canvases if all(holds(c, n) for n in needs)]
    return min(fits, key=lambda c: (c[0] * c[1], c[0])) if fits else None


def enclosing(needs: Iterable[Canvas]) -> Canvas:
    """The smallest canvas holding all of `needs` (for a batch beyond every configured canvas)."""
    needs = list(needs)
    return max(n[0] for n in needs), max(n[1] for n in needs)


def image_row(h: int, w: int, rh: int, rw: int) -> np.ndarray:
    """An image's row of per-image numbers (ROW float32 values): the resized size, the float32 ratio
    back to input pixels as torchvision computes it (float32(w) / float32(rw): IEEE division is
    correctly rounded on the host as on the device, and detectron2's Python float w / rw rounds to the
    same float32), and the input size."""
    sizes = np.array([w, h, w, h], np.float32)
    ratio = sizes / np.array([rw, rh, rw, rh], np.float32)
    return np.array([rh, rw, *ratio, h, w], np.float32)
