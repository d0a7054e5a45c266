"""Mask pasting for all instances in one Triton launch, ragged: no canvas, no padding to the largest box.

mask_rle.paste_transitions' torch path resamples instances in chunks, each on
a canvas as large as the chunk's largest box, about eight kernels a chunk: the
100 instances of one image (boxes from 22 to 842 pixels wide, 7 to 197 high)
landed on one 197 x 842 canvas, 30 times the pixels they cover. Here every
instance gets exactly its own area, and one kernel writes all of them.

Each instance i has need_w columns and need_h rows that can land in the image
(its integer box, cut at the image's right and bottom edges; columns and rows
left of or above the image are computed as off). Its part of one ragged byte
buffer holds, column after column (COCO's column-major order), need_h + 1
change slots: slot r of column c is 1 where the pasted mask's value at local
row r differs from the one at row r - 1, rows -1 and need_h being off, so
slot 0 is the first row's value and slot need_h the last row's. Instance i,
column c, slot r lives at offset[i] + c * (need_h + 1) + r.

Each instance's part is cut into tiles of BLOCK consecutive slots (a tile may
span several columns; only an instance's last tile is partly masked), and the
kernel runs one program per tile. The host sends, in one host-to-device copy,
each instance's int64 offset and seven int32 fields (x0, y0, the box's full h
and w, need_h, need_w, and the index of its first tile); a program finds its
instance by a binary search over the first-tile indices (about log2(N)
cached loads) rather than reading a tile table, which at a batch of 16 images
(some 20,000 tiles) cost more on the host to build and send than the kernel
takes. Each program computes the values at its slots' rows and at the rows
just above them itself, so tiles are independent. Then one nonzero over the
buffer, and a second small kernel turns each hit into (instance, flat image
position x * height + y) by a binary search over the offsets (one launch where
torch operations took a dozen). The hits come out in buffer order: by
instance, then position.

The value at a pixel is F.interpolate(mode="bilinear", align_corners=False)
of the mask padded by one zero pixel on each side, to the box's full (h, w),
in PyTorch's arithmetic (upsample_bilinear2d): scale = in / out in float32
(IEEE division), src = scale * (dst + 0.5) - 0.5 clamped at 0, i0 = floor,
i1 = min(i0 + 1, in - 1), l1 = src - i0, l0 = 1 - l1, value =
l0y * (l0x * a + l1x * b) + l1y * (l0x * c + l1x * d), compiled without fused
multiply-adds so that it rounds the same way everywhere (the GPU and Triton's
interpreter, which tests/unit/engines/test_paste_kernel.py uses). PyTorch's own kernels
are not one fixed rounding: its CPU kernel's compiler contracts these
products into fused multiply-adds, in an order that depends on the output's
size, and its CUDA kernel is compiled with contraction too, so any two of
them can differ in the last bit; only a value within about one float32 step
of the threshold can come out differently. (Measured on an H200, 1,600 masks
of 16 images: the kernel's changes equal torchvision's on the CPU and on the
GPU for the 400 checked; the matrix-product path differed in 4 of 1.34 M.)

detectron2's paste (D2=True; its paste_masks_in_image) is the other rule:
each pixel (x, y) samples the mask at its centre, value = F.grid_sample(mask,
align_corners=False, zero padding) at u = (x + 0.5 - x0) / (x1 - x0) * 2 - 1
(v likewise) of the box's float corners, and is on where value >= threshold;
only pixels in [max(floor(x0) - 1, 0), min(ceil(x1) + 1, W)) x (the same for
y) are computed, as detectron2 does on the CPU, the rest is off. The
instance's area is that region (x0, y0 its start, need its size, possibly
0), and the float box rides along (fields 7-10, as float32 bits). The
arithmetic is PyTorch's CPU grid sampler's, one float32 operation at a time:
ix = (u + 1) * (M / 2) - 0.5, x_w = floor(ix), w = ix - x_w, e = 1 - w (and
n, s for y), value = a * (s * e) + b * (s * w) + c * (n * e) + d * (n * w)
summed left to right, a corner outside the mask reading 0. The torch path
(mask_rle._grid_sample_chunk) does the same operations, so the two agree
value for value (tests/unit/engines/test_paste_detectron2.py, which also checks both
against F.grid_sample itself).
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None

BLOCK = 1024  # change slots per program
NUM_WARPS = 4
POSITION_BLOCK = 1024  # hits per program of the kernel that turns them into positions
# The ragged buffer's size is bounded by this (1 GiB; slot indices within an instance are int32, the
# buffer's are int64); a batch that needs more is pasted in several groups of instances, one launch each.
MAX_SLOTS = 1 << 30

if triton is not None:

    @triton.jit
    def _tap(base, iy, ix, ok, M: tl.constexpr):
        """The 1-padded mask at (iy, ix) of [0, M + 1]^2, as float32 (the padding is 0)."""
        inner = ok & (iy >= 1) & (iy <= M) & (ix >= 1) & (ix <= M)
        return tl.load(base + (iy - 1) * M + (ix - 1), mask=inner, other=0.0).to(tl.float32)

    @triton.jit
    def _pasted(base, r, need_h, y0, height, scale_y, ix0, ix1, lx0, lx1, ok, threshold, M: tl.constexpr):
        """Whether the pasted mask is on at box-local row r (of the columns ix0/ix1/lx0/lx1 give):
        torch's bilinear arithmetic, then the threshold; rows outside the box or the image are off."""
        inside = ok & (r >= 0) & (r < need_h) & (y0 + r >= 0) & (y0 + r < height)
        src = tl.maximum(scale_y * (r.to(tl.float32) + 0.5) - 0.5, 0.0)
        iy0 = tl.minimum(src.to(tl.int32), M + 1)  # src >= 0: truncation is floor
        iy1 = tl.minimum(iy0 + 1, M + 1)
        ly1 = src - iy0.to(tl.float32)
        ly0 = 1.0 - ly1
        a = _tap(base, iy0, ix0, inside, M)
        b = _tap(base, iy0, ix1, inside, M)
        c = _tap(base, iy1, ix0, inside, M)
        d = _tap(base, iy1, ix1, inside, M)
        value = ly0 * (lx0 * a + lx1 * b) + ly1 * (lx0 * c + lx1 * d)
        return inside & (value >= threshold)

    @triton.jit
    def _tap0(base, iy, ix, ok, M: tl.constexpr):
        """The mask at (iy, ix), 0 outside [0, M)^2 (grid_sample's zero padding), as float32."""
        inner = ok & (iy >= 0) & (iy < M) & (ix >= 0) & (ix < M)
        return tl.load(base + iy * M + ix, mask=inner, other=0.0).to(tl.float32)

    @triton.jit
    def _grid_axis(p, lo, hi, M: tl.constexpr):
        """For pixels p (float32) of one axis and the box's float corners lo < hi: grid_sample's
        (first index, weight of the next index, weight of the first) at the pixel centres."""
        u = tl.math.div_rn((p + 0.5) - lo, hi - lo) * 2.0 - 1.0
        s = (u + 1.0) * (M * 0.5) - 0.5
        s = tl.minimum(tl.maximum(s, -2.0), M + 1.0)  # beyond reads only padding; keeps the cast defined
        first = tl.math.floor(s)
        frac = s - first
        return first.to(tl.int32), frac, 1.0 - frac

    @triton.jit
    def _pasted_d2(base, r, need_h, y0, height, by0, by1, ix, wx, ex, ok, threshold, M: tl.constexpr):
        """detectron2's paste at region-local row r: grid_sample at the pixel centre, then the threshold."""
        inside = ok & (r >= 0) & (r < need_h) & (y0 + r >= 0) & (y0 + r < height)
        iy, ny, sy = _grid_axis((y0 + r).to(tl.float32), by0, by1, M)
        a = _tap0(base, iy, ix, inside, M)
        b = _tap0(base, iy, ix + 1, inside, M)
        c = _tap0(base, iy + 1, ix, inside, M)
        d = _tap0(base, iy + 1, ix + 1, inside, M)
        value = a * (sy * ex) + b * (sy * wx) + c * (ny * ex) + d * (ny * wx)
        return inside & (value >= threshold)

    @triton.jit
    def _tile_instance(fields_ptr, n, t, step):
        """The instance whose slots tile t covers: the last i with first_tile[i] <= t (a binary search;
        step is the largest power of two <= n, and first_tile, fields row 6, is nondecreasing from 0)."""
        i = 0
        while step > 0:
            cand = i + step
            go = (cand < n) & (tl.load(fields_ptr + 6 * n + tl.minimum(cand, n - 1)) <= t)
            i = tl.where(go, cand, i)
            step = step // 2
        return i

    @triton.jit
    def _tile_changes(masks_ptr, fields_ptr, floats_ptr, n, i, t, height, width, threshold,
                      M: tl.constexpr, BLOCK: tl.constexpr, D2: tl.constexpr):
        """Tile t of instance i: its slots' indices within the instance (e), which of them exist
        (valid), their column and row, and whether the pasted mask changes value there (change)."""
        x0 = tl.load(fields_ptr + 0 * n + i)
        y0 = tl.load(fields_ptr + 1 * n + i)
        h = tl.load(fields_ptr + 2 * n + i)
        w = tl.load(fields_ptr + 3 * n + i)
        need_h = tl.load(fields_ptr + 4 * n + i)
        need_w = tl.load(fields_ptr + 5 * n + i)
        first_tile = tl.load(fields_ptr + 6 * n + i)
        slots = need_h + 1
        e = (t - first_tile) * BLOCK + tl.arange(0, BLOCK)  # the tile's slots, within the instance
        valid = e < need_w * slots
        col = e // slots
        row = e - col * slots
        ok = valid & (x0 + col >= 0) & (x0 + col < width)
        base = masks_ptr + i.to(tl.int64) * (M * M)
        if D2:
            # The box's float corners: fields 7-10, read through the float32 view of the fields.
            bx0 = tl.load(floats_ptr + 7 * n + i)
            by0 = tl.load(floats_ptr + 8 * n + i)
            bx1 = tl.load(floats_ptr + 9 * n + i)
            by1 = tl.load(floats_ptr + 10 * n + i)
            # An empty (or NaN) box pastes nothing; its corners are replaced so that nothing divides by 0.
            box_ok = (bx1 > bx0) & (by1 > by0)
            ok = tl.where(box_ok, ok, False)  # (not `ok & box_ok`: Triton's interpreter cannot and those)
            bx0, bx1 = tl.where(box_ok, bx0, 0.0), tl.where(box_ok, bx1, 1.0)
            by0, by1 = tl.where(box_ok, by0, 0.0), tl.where(box_ok, by1, 1.0)
            ix, wx, ex = _grid_axis((x0 + col).to(tl.float32), bx0, bx1, M)
            now = _pasted_d2(base, row, need_h, y0, height, by0, by1, ix, wx, ex, ok, threshold, M)
            above = _pasted_d2(base, row - 1, need_h, y0, height, by0, by1, ix, wx, ex, ok, threshold, M)
        else:
            # IEEE division, as torch's float scale (Triton's "/" on float32 is an approximate one).
            padded = tl.full([BLOCK], M + 2, tl.float32)
            scale_x = tl.math.div_rn(padded, tl.full([BLOCK], 1, tl.float32) * w.to(tl.float32))
            scale_y = tl.math.div_rn(padded, tl.full([BLOCK], 1, tl.float32) * h.to(tl.float32))
            src_x = tl.maximum(scale_x * (col.to(tl.float32) + 0.5) - 0.5, 0.0)
            ix0 = tl.minimum(src_x.to(tl.int32), M + 1)  # src >= 0: truncation is floor
            ix1 = tl.minimum(ix0 + 1, M + 1)
            lx1 = src_x - ix0.to(tl.float32)
            lx0 = 1.0 - lx1
            now = _pasted(base, row, need_h, y0, height, scale_y, ix0, ix1, lx0, lx1, ok, threshold, M)
            above = _pasted(base, row - 1, need_h, y0, height, scale_y, ix0, ix1, lx0, lx1, ok, threshold, M)
        return e, valid, col, row, valid & (now != above)

    # One compilation for all sizes and detection counts: the fields sit after the n int64 offsets, so
    # their pointer's 16-byte alignment follows n's parity (specialization.py).
    @triton.jit(do_not_specialize=["fields_ptr", "floats_ptr", "n", "height", "width", "step"])
    def _paste_kernel(masks_ptr, offsets_ptr, fields_ptr, floats_ptr, out_ptr, n, height, width, threshold, step,
                      M: tl.constexpr, BLOCK: tl.constexpr, D2: tl.constexpr):
        t = tl.program_id(0)
        i = _tile_instance(fields_ptr, n, t, step)
        offset = tl.load(offsets_ptr + i)  # int64, as the out pointer's arithmetic
        e, valid, _, _, change = _tile_changes(masks_ptr, fields_ptr, floats_ptr, n, i, t, height, width,
                                               threshold, M, BLOCK, D2)
        tl.store(out_ptr + offset + e, change.to(tl.uint8), mask=valid)

    @triton.jit(do_not_specialize=["fields_ptr", "k", "n", "height", "step"])
    def _position_kernel(hits_ptr, offsets_ptr, fields_ptr, inst_ptr, pos_ptr, k, n, height, step,
                         BLOCK: tl.constexpr):
        """Each hit (a change slot's index in the ragged buffer) as (instance, x * height + y)."""
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = j < k
        hit = tl.load(hits_ptr + j, mask=ok, other=0)
        i = tl.zeros([BLOCK], tl.int32)  # the last instance whose offset is <= hit
        while step > 0:
            cand = i + step
            go = (cand < n) & (tl.load(offsets_ptr + tl.minimum(cand, n - 1)) <= hit)
            i = tl.where(go, cand, i)
            step = step // 2
        rel = (hit - tl.load(offsets_ptr + i)).to(tl.int32)
        slots = tl.load(fields_ptr + 4 * n + i) + 1
        col = rel // slots
        row = rel - col * slots
        x = tl.load(fields_ptr + 0 * n + i) + col
        y = tl.load(fields_ptr + 1 * n + i) + row
        tl.store(inst_ptr + j, i.to(tl.int64), mask=ok)
        tl.store(pos_ptr + j, x.to(tl.int64) * height + y, mask=ok)


def available() -> bool:
    return triton is not None


def plan(ib: np.ndarray, h: np.ndarray, w: np.ndarray, need: np.ndarray,
         block: int = BLOCK, boxes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The host's part, from the integer boxes: each instance's offset in the ragged buffer (int64),
    its fields (7 x N int32: x0, y0, h, w, need_h, need_w, first tile; with detectron2's rule 4 more,
    the float box's x0, y0, x1, y1 as float32 bits), the number of tiles and the buffer's size.
    An instance with no rows or columns has no slots and no tiles."""
    need_h, need_w = need[:, 0].astype(np.int64), need[:, 1].astype(np.int64)
    sizes = np.where(need_h > 0, need_w * (need_h + 1), 0)
    ends = np.cumsum(sizes)
    tiles = np.cumsum(-(-sizes // block))
    first_tile = np.concatenate([np.zeros(1, np.int64), tiles[:-1]])
    fields = np.stack([ib[:, 0], ib[:, 1], h, w, need_h, need_w, first_tile]).astype(np.int32)
    if boxes is not None:
        bits = np.ascontiguousarray(boxes, dtype=np.float32).T.copy().view(np.int32)
        fields = np.concatenate([fields, bits])
    return ends - sizes, fields, int(tiles[-1]), int(ends[-1])


def transitions(masks: torch.Tensor, ib: np.ndarray, h: np.ndarray, w: np.ndarray, need: np.ndarray,
                height: int, width: int, threshold: float, max_slots: int | None = None,
                block: int | None = None, boxes: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(instance, x * height + y) of every change of every pasted mask, as mask_rle.paste_transitions.

    masks: N x M x M probabilities on the device (float32 or float16); ib: N x 4 integer boxes
    (x0, y0, x1, y1, torchvision's expanded and truncated ones); h, w: the boxes' full sizes;
    need: N x 2, the rows and columns of each box that can land in the image (at least 1).
    boxes: N x 4 float32 boxes for detectron2's rule (then ib's first two columns are each region's
    start, need its size, which may be 0, and h, w are not read).
    threshold must be positive (what lies outside the image is 0).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    max_slots = MAX_SLOTS if max_slots is None else max_slots
    block = BLOCK if block is None else block
    n = masks.shape[0]
    dev = masks.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty.clone()
    sizes = need[:, 1].astype(np.int64) * (need[:, 0].astype(np.int64) + 1)
    if int(sizes.max()) > 1 << 30 or max(height, width) >= 1 << 30:  # the kernels' int32 indices
        raise ValueError(f"a mask of {int(sizes.max())} change slots, or an image of {height} x {width}, "
                         "is too large for the paste kernel")
    if n > 1 and int(sizes.sum()) > max_slots:  # in groups of consecutive instances within the bound
        cut = max(int(np.searchsorted(np.cumsum(sizes), max_slots, side="right")), 1)
        a = transitions(masks[:cut], ib[:cut], h[:cut], w[:cut], need[:cut], height, width, threshold,
                        max_slots, block, None if boxes is None else boxes[:cut])
        b = transitions(masks[cut:], ib[cut:], h[cut:], w[cut:], need[cut:], height, width, threshold,
                        max_slots, block, None if boxes is None else boxes[cut:])
        return torch.cat([a[0], b[0] + cut]), torch.cat([a[1], b[1]])
    m = masks.shape[-1]
    if masks.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        masks = masks.float()
    masks = masks.contiguous()
    offsets, fields, tiles, total = plan(ib, h, w, need, block, boxes)
    if total == 0:  # nothing of any instance lands in the image
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty.clone()
    # Everything the device needs from the host, in one copy: the int32 fields ride as int64 pairs.
    flat = fields.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int32)])
    packed = torch.from_numpy(np.concatenate([offsets, flat.view(np.int64)])).to(dev)
    offsets_t = packed[:n]
    fields_t = packed[n:].view(torch.int32)
    change = torch.empty(total, dtype=torch.uint8, device=dev)
    # No fused multiply-adds: the resampling rounds as separate float32 operations, on any device.
    _paste_kernel[(tiles,)](masks, offsets_t, fields_t, fields_t.view(torch.float32), change, n, height, width,
                            float(threshold),
                            1 << (n.bit_length() - 1), M=m, BLOCK=block, D2=boxes is not None,
                            num_warps=NUM_WARPS, enable_fp_fusion=False)
    hits = torch.nonzero(change)[:, 0]  # in order: by instance, then column-major position
    k = hits.shape[0]
    inst = torch.empty(k, dtype=torch.int64, device=dev)
    pos = torch.empty(k, dtype=torch.int64, device=dev)
    if k:
        _position_kernel[(triton.cdiv(k, POSITION_BLOCK),)](hits, offsets_t, fields_t, inst, pos, k, n, height,
                                                             1 << (n.bit_length() - 1), BLOCK=POSITION_BLOCK)
    return inst, pos
