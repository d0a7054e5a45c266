"""Masks pasted and COCO RLE strings made for a whole batch with fixed shapes: no host value, no sync,
so that the fast engine can record it into its network's CUDA graph.

At batch 1 the paste and RLE after the network (masks.paste_and_encode: the host plans the paste from
the boxes, six Triton launches, a nonzero and the text's size read back, each a sync) took about 1.2 ms
of host time for 0.15 ms of GPU work (BENCHMARKS.md, S17-1): the GPU waited for the host. Here every
size the host used to compute lives on the device, every buffer has a fixed capacity, and the kernels
loop over what the device counted (persistent programs), so one graph replay does it all and the host
reads back only the strings' bounds, then the strings.

For N instances (a batch's detection slots, valid or not) with their images' own sizes:

  1. plan(): the paste's fields per instance, as paste.plan computes them on the host (torchvision's
     expanded integer box, or detectron2's region; an instance that is not valid gets no slots), and
     each instance's first tile, in torch operations on the device.
  2. _count_kernel: for every tile of change slots (paste.py's layout: BLOCK consecutive slots of one
     instance, column-major), how many changes it holds (paste._tile_changes, the same arithmetic).
  3. torch.cumsum of those counts: where each tile's changes go.
  4. _emit_kernel: each tile's changes again, written as (instance, x * height + y) at their place:
     sorted by instance, then position, as paste.transitions gives them (no byte buffer, no nonzero).
  5. The strings, as rle.strings makes them (its steps, its arithmetic) but with the changes' count read
     on the device and each instance's own image size: _mark_kernel, cumsum, _compact_kernel,
     _run_kernel, cumsum, _write_kernel.

Capacities: `changes` (all instances' changes together), `tiles`, and the text's bytes from the changes
(text_capacity); what the batch needed is returned beside the bounds, so the caller sees when it did not
fit (then the strings are not complete, and it pastes that batch the other way). The strings are
pycocotools' exactly (tests/unit/engines/test_graph_masks.py compares them with masks.paste_and_encode in
Triton's interpreter, and on a GPU the engine's answers with and without them).
"""

from __future__ import annotations

import numpy as np
import torch

from dd.worker.engines.kernels import paste as paste_kernel
from dd.worker.engines.kernels import rle as rle_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None

BLOCK = paste_kernel.BLOCK  # change slots per tile
RUN_BLOCK = 1024  # changes, runs or instances per program step of the RLE kernels
NUM_WARPS = 4
MAX_CHARS = 7  # characters of one run at most: |x| < 2**32 (pycocotools' uint32 counts)
FIELDS = 13  # paste.py's 11 rows, then each instance's image height and width
HEAD_EXTRA = 4  # the head's values after the bounds: changes and tiles needed, then their capacities

if triton is not None:
    _tile_instance = paste_kernel._tile_instance
    _tile_changes = paste_kernel._tile_changes
    _marks, _run_starts, _run_instance = rle_kernel._marks, rle_kernel._run_starts, rle_kernel._run_instance
    _run_value, _write_run, _bounds = rle_kernel._run_value, rle_kernel._write_run, rle_kernel._bounds

    @triton.jit
    def _tile(masks_ptr, fields_ptr, floats_ptr, n, t, threshold, step,
              M: tl.constexpr, BLOCK: tl.constexpr, D2: tl.constexpr):
        """Tile t: its instance, that instance's image height, the slots' columns and rows, and where the
        pasted mask changes value (paste._tile_changes at the instance's own image size)."""
        i = _tile_instance(fields_ptr, n, t, step)
        height = tl.load(fields_ptr + 11 * n + i)
        width = tl.load(fields_ptr + 12 * n + i)
        _, _, col, row, change = _tile_changes(masks_ptr, fields_ptr, floats_ptr, n, i, t, height, width,
                                               threshold, M, BLOCK, D2)
        return i, height, col, row, change

    @triton.jit
    def _total(fields_ptr, n, i, ok):
        """Instance i's image height * width (int64), where its last run ends."""
        return (tl.load(fields_ptr + 11 * n + i, mask=ok, other=0).to(tl.int64)
                * tl.load(fields_ptr + 12 * n + i, mask=ok, other=0))

    @triton.jit(do_not_specialize=["tiles_ptr", "n", "tiles_cap", "step"])
    def _count_kernel(masks_ptr, fields_ptr, floats_ptr, tiles_ptr, counts_ptr, n, tiles_cap, threshold, step,
                      M: tl.constexpr, BLOCK: tl.constexpr, D2: tl.constexpr, PROGRAMS: tl.constexpr):
        """counts[t]: the changes in tile t, for every tile the plan counted (within the capacity)."""
        tiles = tl.minimum(tl.load(tiles_ptr), tiles_cap).to(tl.int32)
        for t in range(tl.program_id(0), tiles, PROGRAMS):
            _, _, _, _, change = _tile(masks_ptr, fields_ptr, floats_ptr, n, t, threshold, step, M, BLOCK, D2)
            tl.store(counts_ptr + t, tl.sum(change.to(tl.int32), 0))

    @triton.jit(do_not_specialize=["tiles_ptr", "n", "tiles_cap", "changes_cap", "step"])
    def _emit_kernel(masks_ptr, fields_ptr, floats_ptr, tiles_ptr, ends_ptr, inst_ptr, pos_ptr, n, tiles_cap,
                     changes_cap, threshold, step, M: tl.constexpr, BLOCK: tl.constexpr, D2: tl.constexpr,
                     PROGRAMS: tl.constexpr):
        """Each tile's changes as (instance, x * height + y), at the tile's place (ends: inclusive cumsum
        of the counts) in tile order: by instance, then column-major position."""
        tiles = tl.minimum(tl.load(tiles_ptr), tiles_cap).to(tl.int32)
        for t in range(tl.program_id(0), tiles, PROGRAMS):
            i, height, col, row, change = _tile(masks_ptr, fields_ptr, floats_ptr, n, t, threshold, step, M,
                                                BLOCK, D2)
            c = change.to(tl.int32)
            local = tl.cumsum(c, 0)  # inclusive: this change's rank within the tile
            at = tl.load(ends_ptr + t).to(tl.int64) - tl.sum(c, 0) + local - 1
            ok = change & (at < changes_cap)
            x = tl.load(fields_ptr + 0 * n + i) + col
            y = tl.load(fields_ptr + 1 * n + i) + row
            tl.store(inst_ptr + at, tl.zeros_like(c) + i, mask=ok)
            tl.store(pos_ptr + at, x * height + y, mask=ok)

    # The RLE: rle.py's steps (its arithmetic, shared), with the changes' count read on the device, persistent
    # programs, and each instance's own image size.
    @triton.jit(do_not_specialize=["changes_cap", "n"])
    def _mark_kernel(inst_ptr, pos_ptr, fields_ptr, count_ptr, keep_ptr, changes_cap, n,
                     BLOCK: tl.constexpr, PROGRAMS: tl.constexpr):
        """keep[j] = 1 where change j makes a mark (rle._mark_kernel)."""
        t = tl.minimum(tl.load(count_ptr), changes_cap).to(tl.int32)
        for b in range(tl.program_id(0), tl.cdiv(t, BLOCK), PROGRAMS):
            j = (b * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
            ok = j < t
            inst = tl.load(inst_ptr + j, mask=ok, other=0)
            pos = tl.load(pos_ptr + j, mask=ok, other=0)
            keep = _marks(inst_ptr, pos_ptr, j, ok, t, inst, pos, _total(fields_ptr, n, inst, ok))
            tl.store(keep_ptr + j, keep.to(tl.int8), mask=ok)

    @triton.jit(do_not_specialize=["changes_cap", "count", "step"])
    def _compact_kernel(inst_ptr, pos_ptr, keep_ptr, rank_ptr, count_ptr, kept_ptr, run_start_ptr, changes_cap,
                        count, step, BLOCK: tl.constexpr, PROGRAMS: tl.constexpr):
        """The kept positions packed, and run_start[i] for i in [0, count] (rle._compact_kernel); step:
        the largest power of two <= the capacity."""
        t = tl.minimum(tl.load(count_ptr), changes_cap).to(tl.int32)
        for b in range(tl.program_id(0), tl.cdiv(t, BLOCK), PROGRAMS):
            j = (b * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
            keep = (j < t) & (tl.load(keep_ptr + j, mask=j < t, other=0) != 0)
            rank = tl.load(rank_ptr + j, mask=keep, other=1)  # inclusive cumsum of keep
            pos = tl.load(pos_ptr + j, mask=keep, other=0)
            tl.store(kept_ptr + rank - 1, pos, mask=keep)
        for b in range(tl.program_id(0), tl.cdiv(count + 1, BLOCK), PROGRAMS):
            i = (b * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # instances
            on = i <= count
            tl.store(run_start_ptr + i, _run_starts(inst_ptr, rank_ptr, i, on, t, step, BLOCK), mask=on)

    @triton.jit(do_not_specialize=["changes_cap", "count", "n", "step"])
    def _run_kernel(kept_ptr, run_start_ptr, fields_ptr, count_ptr, value_ptr, chars_ptr, changes_cap, count, n,
                    step, BLOCK: tl.constexpr, PROGRAMS: tl.constexpr):
        """For every run slot, pycocotools' value and its number of characters (rle._run_kernel)."""
        runs = tl.minimum(tl.load(count_ptr), changes_cap).to(tl.int32) + count
        for b in range(tl.program_id(0), tl.cdiv(runs, BLOCK), PROGRAMS):
            r = (b * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
            ok = r < runs
            i = _run_instance(run_start_ptr, r, count, step, BLOCK)
            x, chars, real = _run_value(kept_ptr, run_start_ptr, r, ok, i, count,
                                        _total(fields_ptr, n, i, ok & (i < count)))
            tl.store(value_ptr + r, x, mask=ok)
            tl.store(chars_ptr + r, tl.where(real, chars, 0).to(tl.int8), mask=ok)

    @triton.jit(do_not_specialize=["changes_cap", "count", "text_cap"])
    def _write_kernel(value_ptr, chars_ptr, ends_ptr, run_start_ptr, count_ptr, text_ptr, bounds_ptr, changes_cap,
                      count, text_cap, BLOCK: tl.constexpr, PROGRAMS: tl.constexpr):
        """Each run's characters at its place in the text (within its capacity), and bounds[i] for i in
        [0, count] (rle._write_kernel; bounds[count] is the text's size, also where it did not fit)."""
        runs = tl.minimum(tl.load(count_ptr), changes_cap).to(tl.int32) + count
        for b in range(tl.program_id(0), tl.cdiv(runs, BLOCK), PROGRAMS):
            r = (b * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
            ok = r < runs
            x = tl.load(value_ptr + r, mask=ok, other=0)
            nc = tl.load(chars_ptr + r, mask=ok, other=0).to(tl.int32)
            end = tl.load(ends_ptr + r, mask=ok, other=0).to(tl.int64)  # inclusive cumsum of the characters
            _write_run(text_ptr + end - nc, x, nc, ok, text_cap - (end - nc))
        for b in range(tl.program_id(0), tl.cdiv(count + 1, BLOCK), PROGRAMS):
            i = (b * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
            on = i <= count
            tl.store(bounds_ptr + i, _bounds(ends_ptr, run_start_ptr, i, on), mask=on)


available = rle_kernel.available  # the same kernels' needs: Triton
_pow2_floor = rle_kernel._pow2_floor


def text_capacity(changes: int, n: int) -> int:
    """The text's bytes for `changes` changes of n instances: a run takes 1 to 7 characters, and those of
    real masks take 1-2 on average (a random model's speckled ones 1.3), so 3 per change, and 7 for each
    instance's last run. A batch whose strings need more is reported (its bounds' last value)."""
    return 3 * changes + MAX_CHARS * n


def fits(head: np.ndarray) -> bool:
    """Whether the batch whose head (encode's, read back) this is fitted every capacity."""
    n = len(head) - HEAD_EXTRA - 1
    changes, tiles = int(head[n + 3]), int(head[n + 4])
    return bool(head[n + 1] <= changes and head[n + 2] <= tiles and head[n] <= text_capacity(changes, n))


def plan(boxes: torch.Tensor, valid: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, mask_size: int,
         rule: str = "torchvision") -> tuple[torch.Tensor, torch.Tensor]:
    """paste.plan's fields on the device, as int32 [FIELDS, N] (rows 11 and 12: each instance's image height
    and width), and the tiles' total ([1] int64). boxes: N x 4 float32 in image pixels; valid: N bool;
    heights, widths: N (any dtype holding integers). The same float32 operations as the host's
    masks._expanded_int_boxes and masks._detectron2_regions, one torch operation each."""
    b = boxes.float()
    hgt = heights.float()
    wid = widths.float()
    if rule == "detectron2":
        x0 = torch.clamp(torch.floor(b[:, 0]) - 1, min=0).to(torch.int64)
        y0 = torch.clamp(torch.floor(b[:, 1]) - 1, min=0).to(torch.int64)
        x1 = torch.minimum(torch.ceil(b[:, 2]) + 1, wid).to(torch.int64)
        y1 = torch.minimum(torch.ceil(b[:, 3]) + 1, hgt).to(torch.int64)
        rows, cols = torch.clamp(y1 - y0, min=0), torch.clamp(x1 - x0, min=0)
        live = valid & (rows > 0) & (cols > 0)
        need_h, need_w = torch.where(live, rows, 0), torch.where(live, cols, 0)
        h, w = need_h, need_w  # not read by detectron2's rule
        floats = b.t().contiguous().view(torch.int32).to(torch.int64)
    elif rule == "torchvision":
        scale = float(np.float32((mask_size + 2) / mask_size))  # float32, as the host's (exact as a float)
        w_half = (b[:, 2] - b[:, 0]) * 0.5 * scale
        h_half = (b[:, 3] - b[:, 1]) * 0.5 * scale
        x_c = (b[:, 2] + b[:, 0]) * 0.5
        y_c = (b[:, 3] + b[:, 1]) * 0.5
        x0, y0 = (x_c - w_half).to(torch.int64), (y_c - h_half).to(torch.int64)
        x1, y1 = (x_c + w_half).to(torch.int64), (y_c + h_half).to(torch.int64)
        w = torch.clamp(x1 - x0 + 1, min=1)
        h = torch.clamp(y1 - y0 + 1, min=1)
        need_h = torch.clamp(torch.minimum(h, hgt.to(torch.int64) - y0), min=1)
        need_w = torch.clamp(torch.minimum(w, wid.to(torch.int64) - x0), min=1)
        need_h, need_w = torch.where(valid, need_h, 0), torch.where(valid, need_w, 0)
        floats = torch.zeros(4, b.shape[0], dtype=torch.int64, device=b.device)
    else:
        raise ValueError(f"unknown mask paste rule {rule!r}: 'torchvision' or 'detectron2'")
    slots = torch.where(need_h > 0, need_w * (need_h + 1), 0)
    tiles = torch.div(slots + (BLOCK - 1), BLOCK, rounding_mode="floor")
    ends = torch.cumsum(tiles, 0)
    fields = torch.stack([x0, y0, h, w, need_h, need_w, ends - tiles, *floats, hgt.to(torch.int64),
                          wid.to(torch.int64)]).to(torch.int32)
    return fields, ends[-1:]


def encode(masks: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, heights: torch.Tensor,
           widths: torch.Tensor, threshold: float, changes: int, tiles: int, rule: str = "torchvision",
           programs: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """pycocotools' compressed RLE string of each of the N masks (N x M x M probabilities) pasted into its
    box of its image (heights, widths: N), by torchvision's rule or detectron2's; masks not valid give an
    empty mask's string. Fixed shapes throughout, no sync: CUDA-graph capturable.

    Returns (head, text): head int64 [N + 1 + HEAD_EXTRA] holds the strings' bounds in text (N + 1
    offsets; the last is the text's size), then the changes and the tiles the batch needed, then their
    capacities; text uint8 holds the strings back to back. Where a need passes its capacity (`changes`,
    `tiles`, text_capacity; fits() says), the strings are not complete: the caller must not use them.
    programs: the persistent kernels' programs (a few per SM)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    n, m = masks.shape[0], masks.shape[-1]
    dev = masks.device
    if masks.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        masks = masks.float()
    masks = masks.contiguous()
    fields, tile_total = plan(boxes, valid, heights, widths, m, rule)
    floats = fields.view(torch.float32)
    step = _pow2_floor(n)
    d2 = rule == "detectron2"
    counts = torch.zeros(tiles, dtype=torch.int32, device=dev)
    _count_kernel[(programs,)](masks, fields, floats, tile_total, counts, n, tiles, float(threshold), step,
                               M=m, BLOCK=BLOCK, D2=d2, PROGRAMS=programs, num_warps=NUM_WARPS,
                               enable_fp_fusion=False)
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    # The changes the batch needed: the last counted tile's end (0 without tiles).
    last = torch.clamp(torch.minimum(tile_total, torch.full_like(tile_total, tiles)) - 1, min=0)
    change_total = torch.where(tile_total > 0, ends.index_select(0, last), 0)
    inst = torch.empty(changes, dtype=torch.int32, device=dev)
    pos = torch.empty(changes, dtype=torch.int32, device=dev)
    _emit_kernel[(programs,)](masks, fields, floats, tile_total, ends, inst, pos, n, tiles, changes,
                              float(threshold), step, M=m, BLOCK=BLOCK, D2=d2, PROGRAMS=programs,
                              num_warps=NUM_WARPS, enable_fp_fusion=False)
    keep = torch.zeros(changes, dtype=torch.int8, device=dev)
    _mark_kernel[(programs,)](inst, pos, fields, change_total, keep, changes, n, BLOCK=RUN_BLOCK,
                              PROGRAMS=programs, num_warps=NUM_WARPS)
    rank = torch.cumsum(keep, 0, dtype=torch.int32)
    kept = torch.empty(changes, dtype=torch.int32, device=dev)
    run_start = torch.empty(n + 1, dtype=torch.int64, device=dev)
    _compact_kernel[(programs,)](inst, pos, keep, rank, change_total, kept, run_start, changes, n,
                                 _pow2_floor(changes), BLOCK=RUN_BLOCK, PROGRAMS=programs, num_warps=NUM_WARPS)
    # Each buffer let go once read for the last time: later ones reuse its memory (in a graph's pool too),
    # so the peak is some 17 bytes per change of capacity (then 9-12) rather than their sum, about 30.
    del inst, pos, keep, rank
    value = torch.empty(changes + n, dtype=torch.int32, device=dev)
    chars = torch.zeros(changes + n, dtype=torch.int8, device=dev)
    _run_kernel[(programs,)](kept, run_start, fields, change_total, value, chars, changes, n, n, step,
                             BLOCK=RUN_BLOCK, PROGRAMS=programs, num_warps=NUM_WARPS)
    char_ends = torch.cumsum(chars, 0, dtype=torch.int32)
    del kept
    text = torch.empty(text_capacity(changes, n), dtype=torch.uint8, device=dev)
    head = torch.empty(n + 1 + HEAD_EXTRA, dtype=torch.int64, device=dev)
    _write_kernel[(programs,)](value, chars, char_ends, run_start, change_total, text, head, changes, n,
                               text.numel(), BLOCK=RUN_BLOCK, PROGRAMS=programs, num_warps=NUM_WARPS)
    head[n + 1:n + 2].copy_(change_total)
    head[n + 2:n + 3].copy_(tile_total)
    head[n + 3:n + 4].fill_(changes)  # constants: fills in the graph
    head[n + 4:n + 5].fill_(tiles)
    return head, text
