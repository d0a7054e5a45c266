"""Mask pasting and COCO RLE, the one place for both: for all instances at once, without full-image
masks (paste_and_encode, any GPU engine), and for full-image masks on the host (rle_encode).

torchvision pastes each instance's 28x28 mask into a full-image tensor in a
Python loop (a dozen kernels per instance) and pycocotools then scans every
pixel of every full-image mask on the CPU. Here all instances are resampled
and thresholded together, each on its own box's area; the positions where a
column of a mask changes value give COCO's column-major run lengths, and
those are written as COCO's compressed strings on the device too. Only the
strings' characters leave the device, so the work and the bytes moved scale
with the boxes' size, not the image's, and the host does nothing per pixel,
run or instance but cut bytes.

The sampling matches torchvision's paste_mask_in_image (pad by one pixel,
expand the box by (M+2)/M, bilinear resize with align_corners=False, integer
box corners), so the masks agree with the reference engine's. On CUDA the
resampling is one Triton kernel over all instances, ragged (kernels/paste.py);
elsewhere (and where that kernel cannot run) it is two batched matrix
products per chunk of instances of similar size, since bilinear resizing is
separable. The strings are byte for byte pycocotools' (tests/integration/test_fast_engine.py,
tests/unit/engines/test_paste_kernel.py).

rule="detectron2" pastes as detectron2's paste_masks_in_image does on the
CPU: each pixel of [max(floor(x0) - 1, 0), min(ceil(x1) + 1, W)) x (likewise
in y) samples the mask at its centre (F.grid_sample, align_corners=False,
zero padding, at u = (x + 0.5 - x0) / (x1 - x0) * 2 - 1) and is on where
that is >= the threshold; nothing outside that region is. The kernel does it
in the same launch structure (kernels/paste.py); the torch path computes the
same float32 operations elementwise, per chunk (_grid_sample_chunk), so the
two agree value for value.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dd.worker.engines.base import RleText
from dd.worker.engines.host_rle import rle_encode  # noqa: F401 - masks' host encoder, re-exported
from dd.worker.engines.kernels import paste as paste_kernel
from dd.worker.engines.kernels import rle as rle_kernel
from dd.worker.engines.kernels.switch import KernelSwitch

log = logging.getLogger(__name__)


def _expanded_int_boxes(boxes: np.ndarray, mask_size: int, padding: int = 1) -> np.ndarray:
    """torchvision's expand_boxes then .to(int64), in the same float32 arithmetic, on the host:
    the chunks are planned from these sizes without waiting for the device."""
    boxes = boxes.astype(np.float32, copy=False)
    scale = np.float32(float(mask_size + 2 * padding) / mask_size)
    half = np.float32(0.5)
    w_half = (boxes[:, 2] - boxes[:, 0]) * half * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * half * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * half
    y_c = (boxes[:, 3] + boxes[:, 1]) * half
    out = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
    return out.astype(np.int64)  # truncation toward zero, as torchvision's .to(int64)


def _interp_matrix(out_sizes: torch.Tensor, out_max: int, in_size: int, start: torch.Tensor,
                   limit: int) -> torch.Tensor:
    """Per instance, the (out_max x in_size) matrix of 1-D bilinear resizing to out_sizes[n] samples.

    Same arithmetic as F.interpolate(mode="bilinear", align_corners=False):
    source = (k + 0.5) * in / out - 0.5, clamped at 0, and the upper neighbour
    clamped at the last input pixel. Rows past an instance's own size, and rows
    that land outside the image (start + k outside [0, limit)), are zero, so
    nothing there reaches the (positive) threshold.
    """
    n = out_sizes.shape[0]
    dev = out_sizes.device
    k = torch.arange(out_max, device=dev, dtype=torch.float32)[None, :]
    scale = in_size / out_sizes.float()[:, None]
    src = ((k + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = src - i0.float()
    pos = start[:, None] + k.long()
    inside = ((k < out_sizes[:, None]) & (pos >= 0) & (pos < limit)).float()
    mat = torch.zeros(n, out_max, in_size, device=dev)
    mat.scatter_add_(2, i0[..., None], ((1 - lam) * inside)[..., None])
    mat.scatter_add_(2, i1[..., None], (lam * inside)[..., None])
    return mat


def _detectron2_regions(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels detectron2 computes for each box (its CPU paste, skip_empty): from max(floor(x0) - 1, 0)
    to min(ceil(x1) + 1, width), exclusive, likewise in y, in the float32 arithmetic it uses.
    Returns the regions' starts (N x 2: x, y) and sizes (N x 2: rows, columns; both 0 where empty)."""
    b = boxes.astype(np.float32, copy=False)
    one = np.float32(1)
    x0 = np.maximum(np.floor(b[:, 0]) - one, 0).astype(np.int64)
    y0 = np.maximum(np.floor(b[:, 1]) - one, 0).astype(np.int64)
    x1 = np.minimum(np.ceil(b[:, 2]) + one, width).astype(np.int64)
    y1 = np.minimum(np.ceil(b[:, 3]) + one, height).astype(np.int64)
    rows, cols = np.maximum(y1 - y0, 0), np.maximum(x1 - x0, 0)
    empty = (rows == 0) | (cols == 0)
    need = np.stack([np.where(empty, 0, rows), np.where(empty, 0, cols)], 1)
    return np.stack([x0, y0], 1), need


def _grid_axis(pixels: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, m: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grid_sample's (first index, weight of the next, weight of the first) at pixel centres [c, K], for
    box corners lo < hi [c, 1]: PyTorch's CPU grid sampler's float32 operations, one at a time, as the
    paste kernel does them (u, then ix = (u + 1) * (M / 2) - 0.5, floor, the fraction)."""
    u = ((pixels + 0.5) - lo) / (hi - lo) * 2 - 1
    s = ((u + 1) * (m * 0.5) - 0.5).clamp(-2.0, m + 1.0)
    first = torch.floor(s)
    frac = s - first
    return first.long(), frac, 1 - frac


def _grid_sample_chunk(masks: torch.Tensor, boxes: torch.Tensor, start: torch.Tensor, count: torch.Tensor,
                       wm: int, hm: int, height: int, width: int) -> torch.Tensor:
    """detectron2's pasted values [c, wm, hm] (columns outer) of c masks [c, M, M] on their regions
    (start [c, 2] x, y; count [c, 2] rows, columns); 0 outside a region, the image, or for an empty box."""
    c, m = masks.shape[0], masks.shape[-1]
    dev = masks.device
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    safe = torch.where(ok[:, None], boxes, torch.tensor([0.0, 0.0, 1.0, 1.0], device=dev))
    kx = torch.arange(wm, device=dev)[None, :]
    ky = torch.arange(hm, device=dev)[None, :]
    px, py = start[:, :1] + kx, start[:, 1:] + ky  # c x wm, c x hm
    ix, wx, ex = _grid_axis(px.float(), safe[:, 0:1], safe[:, 2:3], m)
    iy, ny, sy = _grid_axis(py.float(), safe[:, 1:2], safe[:, 3:4], m)
    in_x = (kx < count[:, 1:]) & (px < width) & ok[:, None]
    in_y = (ky < count[:, :1]) & (py < height)
    flat = F.pad(masks.float(), (1, 1, 1, 1)).reshape(c, -1)  # the zero padding at index -1 and M

    def tap(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        """The mask at rows yi [c, hm] and columns xi [c, wm], 0 outside it: c x wm x hm."""
        inside = ((xi >= 0) & (xi < m))[:, :, None] & ((yi >= 0) & (yi < m))[:, None, :]
        index = (yi.clamp(-1, m)[:, None, :] + 1) * (m + 2) + (xi.clamp(-1, m)[:, :, None] + 1)
        return torch.where(inside, flat.gather(1, index.reshape(c, -1)).view(c, wm, hm), 0.0)

    sy, ny, ex, wx = sy[:, None, :], ny[:, None, :], ex[:, :, None], wx[:, :, None]
    value = (tap(iy, ix) * (sy * ex) + tap(iy, ix + 1) * (sy * wx) + tap(iy + 1, ix) * (ny * ex)
             + tap(iy + 1, ix + 1) * (ny * wx))
    return torch.where(in_x[:, :, None] & in_y[:, None, :], value, 0.0)


def _plan_chunks(need: np.ndarray, max_elements: int,
                 waste: float | None = None) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """An order of the instances, and that order cut into chunks whose canvas (count x tallest x
    widest) holds at most max_elements pixels: (first, end) positions in the order, and the chunk's
    canvas height and width.

    waste None: in order of area, cut only by max_elements: few chunks, for a GPU, where the
    launches cost more than the canvas does. waste w: grouped by width (within a factor of two),
    by height within a group, and cut also where the canvas would pass w times the pixels of the
    chunk's own boxes: for the CPU, where the canvas's pixels are the cost (ordering by area alone
    put the boxes of one image, 22 to 842 pixels wide and 7 to 197 high, on one canvas 10 to 30
    times their size; grouped with w = 3, the CPU pastes such an image 30 times faster)."""
    n = len(need)
    hgt, wid = need[:, 0].astype(np.int64), need[:, 1].astype(np.int64)
    if waste is None:
        group = np.zeros(n, np.int64)
        order = np.argsort(hgt * wid, kind="stable")
    else:
        group = np.floor(np.log2(wid)).astype(np.int64)
        order = np.lexsort((hgt, group))
    chunks, lo = [], 0
    while lo < n:
        hi, hm, wm, real = lo, 1, 1, 0
        while hi < n:
            j = order[hi]
            nh, nw, nreal = max(hm, int(hgt[j])), max(wm, int(wid[j])), real + int(hgt[j] * wid[j])
            canvas = (hi - lo + 1) * nh * nw
            if hi > lo and (group[j] != group[order[lo]] or canvas > max_elements
                            or (waste is not None and canvas > waste * nreal)):
                break
            hi, hm, wm, real = hi + 1, nh, nw, nreal
        chunks.append((lo, hi, hm, wm))
        lo = hi
    return order, chunks


_PASTE = KernelSwitch("paste kernel", "pasting with torch operations instead", paste_kernel.available)
_RLE = KernelSwitch("RLE kernels", "encoding with torch operations instead", rle_kernel.available)


def paste_transitions(masks: torch.Tensor, boxes: torch.Tensor | np.ndarray, height: int, width: int,
                      threshold: float = 0.5, max_elements: int = 1 << 26,
                      kernel: bool | None = None, rule: str = "torchvision") -> tuple[torch.Tensor, torch.Tensor]:
    """Where each pasted mask changes value, in COCO's column-major pixel order.

    masks: N x M x M probabilities (on the device that does the work); boxes:
    N x 4 in image pixels, preferably as a host array (the engine has them
    there already; a device tensor costs a sync). threshold must be positive.
    Returns (instance index, flat index x*H + y) pairs as two int64 tensors on
    the masks' device, in no particular order.

    kernel: paste with the Triton kernel of paste_kernel.py (every instance on
    exactly its own area, all in one launch, then one nonzero). None (the
    default) uses it on CUDA devices where Triton is installed, and where it
    cannot run there (no compiler, an unsupported GPU) logs that once and uses
    the torch path from then on; True uses it on any device (Triton's
    interpreter runs it on the CPU) and raises its errors; False never.

    The torch path: resizing is separable, so it is two small batched matrix
    products per chunk of instances. Instances are chunked by size (on the CPU
    by width, then height, see _plan_chunks), each chunk on a canvas as large
    as its own largest box and under `max_elements`: one large box does not
    make every small one pay for its canvas (a batch of 8 images with 100
    instances each holds boxes of every size). The chunks are planned on the
    host from the boxes, and all their change maps go into one buffer, read by
    one nonzero.

    rule: "torchvision" (its paste_mask_in_image) or "detectron2" (its paste_masks_in_image; the torch
    path then samples each chunk elementwise, _grid_sample_chunk).
    """
    if not threshold > 0:
        raise ValueError(f"the mask threshold must be positive, not {threshold}")
    if rule not in ("torchvision", "detectron2"):
        raise ValueError(f"unknown mask paste rule {rule!r}: 'torchvision' or 'detectron2'")
    n, m = masks.shape[0], masks.shape[-1]
    dev = masks.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.int64, device=dev)
    host = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    d2 = rule == "detectron2"
    if d2:
        host = host.astype(np.float32, copy=False)
        starts, need = _detectron2_regions(host, height, width)
        ib = np.concatenate([starts, starts], 1)  # only the regions' starts are read
        h, w = need[:, 0], need[:, 1]
    else:
        ib = _expanded_int_boxes(host, m)
        w = np.maximum(ib[:, 2] - ib[:, 0] + 1, 1)
        h = np.maximum(ib[:, 3] - ib[:, 1] + 1, 1)
        # The rows and columns of each box that can still land in the image (an expanded box may
        # start above or left of it, so that is not simply the image's size).
        need = np.maximum(np.stack([np.minimum(h, height - ib[:, 1]), np.minimum(w, width - ib[:, 0])], 1), 1)
    float_boxes = host if d2 else None
    if kernel:
        return paste_kernel.transitions(masks, ib, h, w, need, height, width, threshold, boxes=float_boxes)
    if kernel is None:
        return _PASTE.run(
            lambda: paste_kernel.transitions(masks, ib, h, w, need, height, width, threshold, boxes=float_boxes),
            lambda: _paste_transitions_torch(masks, host, ib, h, w, need, height, width, threshold, max_elements,
                                             d2), on=masks)
    return _paste_transitions_torch(masks, host, ib, h, w, need, height, width, threshold, max_elements, d2)


def _paste_transitions_torch(masks: torch.Tensor, host: np.ndarray, ib: np.ndarray, h: np.ndarray, w: np.ndarray,
                             need: np.ndarray, height: int, width: int, threshold: float, max_elements: int,
                             d2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """paste_transitions in torch operations (the CPU's path, and the fallback where the kernel cannot run)."""
    n, m = masks.shape[0], masks.shape[-1]
    dev = masks.device
    if d2:  # canvases of at least one pixel; an empty region's instance samples nothing (h, w = 0)
        need = np.maximum(need, 1)
        max_elements = max(max_elements // 32, 1)  # elementwise sampling holds ~30 bytes a pixel at once
    order, chunks = _plan_chunks(need, max_elements, 3.0 if dev.type == "cpu" else None)
    sizes = [(hi - lo) * wm * (hm + 1) for lo, hi, hm, wm in chunks]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    meta = np.array([[s, lo, wm, hm + 1] for s, (lo, _, hm, wm) in zip(starts, chunks)], np.int64)
    # Everything the device needs from the host, in one copy.
    packed = torch.from_numpy(np.concatenate([ib[:, 0], ib[:, 1], h, w, order, meta.T.reshape(-1)])).to(dev)
    x0, y0, h_t, w_t, order_t = packed[:5 * n].view(5, n)
    c_start, c_first, c_w, c_hp = packed[5 * n:].view(4, len(chunks))
    if d2:
        box_t = torch.from_numpy(host).to(dev)
        start_t, count_t = torch.stack([x0, y0], 1), torch.stack([h_t, w_t], 1)
    else:
        ry = _interp_matrix(h_t, max(c[2] for c in chunks), m + 2, y0, height)  # N x Hmax x (M+2)
        rx = _interp_matrix(w_t, max(c[3] for c in chunks), m + 2, x0, width)  # N x Wmax x (M+2)
        padded = F.pad(masks.float(), (1, 1, 1, 1))  # N x (M+2) x (M+2)
    change = torch.empty(int(sum(sizes)), dtype=torch.bool, device=dev)
    for (lo, hi, hm, wm), start, size in zip(chunks, starts, sizes):
        sel = order_t[lo:hi]
        # Column-major directly: columns outer, rows inner.
        if d2:
            cols = _grid_sample_chunk(masks[sel], box_t[sel], start_t[sel], count_t[sel], wm, hm, height, width)
        else:
            cols = torch.bmm(torch.bmm(rx[sel, :wm], padded[sel].transpose(1, 2)), ry[sel, :hm].transpose(1, 2))
        binary = cols >= threshold  # c x Wm x Hm
        # A change at local row k of a column (rows above the first and below the last are off).
        out = change[start:start + size].view(hi - lo, wm, hm + 1)
        out[..., 0] = binary[..., 0]
        torch.ne(binary[..., 1:], binary[..., :-1], out=out[..., 1:hm])
        out[..., hm] = binary[..., hm - 1]
    hits = change.nonzero()[:, 0]
    chunk = torch.searchsorted(c_start, hits, right=True) - 1
    rel = hits - c_start[chunk]
    per = c_w[chunk] * c_hp[chunk]
    local = rel // per
    col = (rel - local * per) // c_hp[chunk]
    row = rel - local * per - col * c_hp[chunk]
    inst = order_t[c_first[chunk] + local]
    return inst, (x0[inst] + col) * height + y0[inst] + row


def rle_strings(inst: torch.Tensor, pos: torch.Tensor, count: int, height: int, width: int,
                presorted: bool = False, kernel: bool | None = None) -> Sequence[bytes]:
    """COCO compressed RLE strings of `count` instances from their change positions, on their device.

    COCO's column-major run lengths are the differences between consecutive
    changes (framed by 0 and H*W), and its string form (pycocotools'
    rleToString: each count, less the count two before it from the fourth on,
    in 5-bit groups, low first, as characters 48 + group, with bit 0x20 on
    every group but the last) is computed here for all runs of all instances
    at once, so only the characters come back to the host: about two bytes a
    run, and no per-pixel or per-run work on the host.

    inst, pos: int64 pairs (instance, x * height + y), as paste_transitions
    gives them; a position may be height * width, and one position may come
    twice (a run that ends at the bottom of a column and one that starts at the
    top of the next). presorted: they come sorted by instance, then position
    (the paste kernel's order), so they need no sort; any order otherwise.

    kernel: the Triton kernels of rle_kernel.py (four launches, two cumsums,
    one sync for the text's size and one copy back), as paste_transitions'
    `kernel`: None (the default) uses them on CUDA devices where Triton is
    installed, and where they cannot run there logs that once and uses the
    torch operations from then on; True uses them on any device (Triton's
    interpreter on the CPU) and raises their errors; False never.
    """
    if count == 0:
        return []
    fits = height * width < rle_kernel.MAX_PIXELS
    if kernel:
        return rle_kernel.strings(inst, pos, count, height, width, presorted)
    if kernel is None and fits:
        return _RLE.run(lambda: rle_kernel.strings(inst, pos, count, height, width, presorted),
                        lambda: _rle_strings_torch(inst, pos, count, height, width, presorted), on=inst)
    return _rle_strings_torch(inst, pos, count, height, width, presorted)


def _rle_strings_torch(inst: torch.Tensor, pos: torch.Tensor, count: int, height: int, width: int,
                       presorted: bool = False) -> Sequence[bytes]:
    """rle_strings in torch operations (the CPU's path, and the fallback where the kernels cannot run)."""
    if count == 0:
        return []
    dev = inst.device
    total = height * width
    # Sorted by instance, then position. A run that reaches the image's last pixel needs no
    # closing mark (COCO ends on the last run); a run ending at the bottom of one column and one
    # starting at the top of the next give the same position twice: one run, both marks go.
    key = inst * (total + 1) + pos
    if not presorted:
        key, _ = torch.sort(key)
    drop = key % (total + 1) >= total
    same = key[1:] == key[:-1]
    drop[1:] |= same
    drop[:-1] |= same
    key = key[~drop]
    inst, pos = key // (total + 1), key % (total + 1)
    t = key.shape[0]
    first = torch.ones(t, dtype=torch.bool, device=dev)
    first[1:] = inst[1:] != inst[:-1]
    before = torch.where(first, 0, pos.roll(1))
    k = torch.bincount(inst, minlength=count)  # changes per instance
    ends = torch.cumsum(k, 0)
    last = torch.where(k > 0, pos[(ends - 1).clamp(min=0)] if t else torch.zeros_like(k), 0)
    # Instance i's runs: one ending at each of its changes, then the last to H*W; slot j + i.
    which = torch.arange(count, device=dev)
    runs = torch.empty(t + count, dtype=torch.int64, device=dev)
    runs[torch.arange(t, device=dev) + inst] = pos - before
    runs[ends + which] = total - last
    run_inst = torch.repeat_interleave(which, k + 1, output_size=t + count)
    index = torch.arange(t + count, device=dev) - (ends - k + which)[run_inst]  # run's index in its RLE
    x = runs - torch.where(index > 2, runs.roll(2), 0)
    shift = torch.arange(0, 35, 5, device=dev)
    groups = (x[:, None] >> shift) & 0x1F
    rest = x[:, None] >> (shift + 5)
    done = torch.where((groups & 0x10) != 0, rest == -1, rest == 0)
    n_chars = done.int().argmax(1) + 1  # the first group after which nothing is left
    place = torch.arange(7, device=dev)[None, :]
    chars = (groups | torch.where(place < (n_chars - 1)[:, None], 0x20, 0)) + 48
    text = chars[place < n_chars[:, None]].to(torch.uint8)
    per_inst = torch.zeros(count, dtype=torch.int64, device=dev).index_add_(0, run_inst, n_chars.long())
    bounds = torch.cat([per_inst.new_zeros(1), torch.cumsum(per_inst, 0)])
    return RleText(text.cpu().numpy(), bounds.cpu().tolist())


def paste_and_encode(masks: torch.Tensor, boxes: torch.Tensor | np.ndarray, height: int, width: int,
                     threshold: float = 0.5, rule: str = "torchvision") -> Sequence[bytes]:
    """COCO compressed RLE of each mask pasted into its box of a height x width image, by torchvision's
    paste rule or detectron2's (paste_transitions)."""
    inst, pos = paste_transitions(masks, boxes, height, width, threshold, rule=rule)
    # The paste kernel gives the changes sorted by instance, then position (paste_kernel.transitions);
    # the torch path does not. Asked after the paste: a kernel that failed in it has switched itself off.
    presorted = _PASTE.by_default(masks.device)
    return rle_strings(inst, pos, masks.shape[0], height, width, presorted)
