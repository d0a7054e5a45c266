"""A batch's input preparation as one CUDA graph, because at small batches the host, not the GPU, sets its pace.

Between a batch's copies to the GPU and the network's graph, the fast engine prepares its inputs: 16-bit
PNG depth rows reconstructed (png_unfilter), color and depth converted, normalised and resized, written
into the canvas slots, each image's numbers copied. That is 25-30 small kernels. Launched one by one
they cost the host 20-50 us each (Python, dispatch, launch) while the GPU runs each in 2-20 us: traced
with torch.profiler on an H200 host (R50-FPN RGB-D, one 1280x720 image), the GPU sat idle for most of
the 0.65 ms they took back to back, and longer after an idle gap, when the host runs slower; a lone
request waits for all of it. Replayed as one graph they cost one launch.

A batch gets a graph when all its images are pixel arrays of one size with one kind of depth (PNG rows,
or pixels of one dtype): its key is (bucket, canvas, input size, depth kind). The graph prepares every
slot of the bucket from static buffers that each image is copied into (slots past the batch get what
their buffers hold; their answers are not read, as with the network's own slots) and zeroes each slot's
rest whole, so it needs no record of what an earlier, larger image left there. Graphs are captured at
load for the warm-up sizes, otherwise in the background (graph_cache.py) while such batches are prepared
op by op as before. The buffers are shared by the buckets of a size and depth kind, and the graphs'
intermediates by all of them (one memory pool: each graph writes only into the network's inputs and
they all run on the engine's stream, one after another). The same operations run either way, so the
network's input is the same bit for bit (tests/unit/engines/test_input_graphs.py, on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dd.png_rows import PngRows

PNG_ROWS = "png-rows"


@dataclass
class InputGraph:
    """One key's graph and the static buffers its images are copied into."""

    color: torch.Tensor  # bucket x H x W x 3 uint8
    depth: torch.Tensor | None  # bucket x H x (1 + 2W) uint8 PNG rows, or bucket x H x W pixels; None for RGB
    resized: tuple[int, int]  # (rh, rw): what the graph writes at each slot's top left
    graph: torch.cuda.CUDAGraph
    # Every tensor the graph reads that was made outside it, held here: memory a graph only points at is
    # otherwise freed after the capture and reused (the images' numbers came out as garbage).
    inputs: tuple[torch.Tensor, ...] = ()
    replays: int = 0  # for tests and benchmarks


def depth_kind(depth: Any) -> str | None:
    """PNG_ROWS, a pixel array's dtype (numpy's str), or None (no depth)."""
    if depth is None:
        return None
    if isinstance(depth, PngRows):
        return PNG_ROWS
    return np.asarray(depth[:1, :1]).dtype.str


def input_key(colors: list[Any], depths: list[Any], rgbd: bool) -> tuple[int, int, str | None] | None:
    """(H, W, depth kind) when every color is an H x W x 3 uint8 array and every depth one kind (and,
    for an RGB-D model, there), else None: such a batch is prepared op by op."""
    if not colors:
        return None
    first = colors[0]
    if not all(isinstance(c, np.ndarray) and c.dtype == np.uint8 and c.ndim == 3 and c.shape == first.shape
               for c in colors) or first.shape[2] != 3:
        return None
    kinds = {depth_kind(d) for d in depths} if rgbd else {None}
    if len(kinds) != 1 or (rgbd and None in kinds):
        return None
    kind = next(iter(kinds))
    if kind == PNG_ROWS and any((d.height, d.width) != first.shape[:2] for d in depths):
        return None
    if kind not in (None, PNG_ROWS) and any(np.shape(d) != first.shape[:2] for d in depths):
        return None
    return int(first.shape[0]), int(first.shape[1]), kind


def buffers(bucket: int, h: int, w: int, kind: str | None, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Static buffers for `bucket` images of one key's size and depth kind (zeros: a warm-up reads them)."""
    color = torch.zeros(bucket, h, w, 3, dtype=torch.uint8, device=device)
    if kind is None:
        return color, None
    if kind == PNG_ROWS:
        return color, torch.zeros(bucket, h, 1 + 2 * w, dtype=torch.uint8, device=device)
    return color, torch.zeros(bucket, h, w, dtype=torch.from_numpy(np.zeros(1, np.dtype(kind))).dtype,
                              device=device)


def copy_in(graph: InputGraph, colors: list[np.ndarray], depths: list[Any]) -> None:
    """Each image into its slot of the static buffers (non-blocking: the sources are page-locked)."""
    for i, color in enumerate(colors):
        graph.color[i].copy_(torch.from_numpy(color), non_blocking=True)
    if graph.depth is None:
        return
    for i, depth in enumerate(depths):
        src = depth.data if isinstance(depth, PngRows) else depth
        graph.depth[i].copy_(torch.from_numpy(src), non_blocking=True)
