"""Multi-level RoI Align as one Triton kernel that reads the FPN levels as they are.

torchvision's roi_align pools from one float32 NCHW tensor, so the engine first
copied the four fp16 channels-last FPN levels into a padded float32 "level
stack" (fixed_shapes.level_stack) and pooled every box from it in one call. On
an H100, for a batch of 16 images (16000 box RoIs at 7x7, 1600 mask RoIs at
14x14), that was about 2.9 ms of conversion and 6.3 ms of roi_align reading
float32. Here one launch pools each RoI from its own level, reading that
level's own dtype (fp16) and layout (any strides; with channels-last the C
values of one pixel are contiguous, so a program's loads of a pixel coalesce),
and accumulates in float32: no stack, no float32 copy of the pyramid. Measured on
an H100 for that batch: 1.2 ms at 7x7 and 0.44 ms at 14x14 (fp16 out), against
3.3 ms of stacking and 5.1 + 1.9 ms of roi_align; contiguous (NCHW) levels pool
correctly but about twice as slowly, since a pixel's channels are then strided.

The arithmetic is torchvision's roi_align with spatial_scale=1
(torchvision/csrc/ops/{cpu,cuda}/roi_align_kernel.*), aligned=False
(torchvision's Mask R-CNN) or aligned=True (detectron2's ROIAlignV2: the box
shifted by half a pixel and not forced to at least 1 x 1): the same sample
positions ((start + p * bin) + (i + 0.5) * bin / grid, IEEE divisions), the
same grid (a fixed one, or with sampling ratio 0 the adaptive one of
ceil(roi size / output size) samples per bin side, a loop bound per RoI),
the same boundary rules (a sample beyond [-1, H] x [-1, W] reads 0; one in
[-1, 0] reads row/column 0; one at or past the last row or column reads it with
weight 1), the same bilinear sum order and the final division by the sample
count. It is compiled without fused multiply-adds, so with float32 levels the
result equals torchvision's CPU kernel bit for bit (tests/unit/engines/test_roi_align_kernel.py
checks that in Triton's interpreter). torchvision's CUDA kernel is built with
nvcc's default contraction, so it differs from both in the last bits.

Level and image indices outside [0, L) and [0, B) pool zeros instead of reading
outside the tensors. Without Triton, callers use roi_align_levels_reference.
"""

from __future__ import annotations

import contextlib
import numbers

import torch
from torchvision.ops import roi_align

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None

MAX_LEVELS = 5  # level pointers the kernel takes; an FPN pools from 4 (P2-P5)
# A program pools BLOCK_C channels of BLOCK_BINS output bins of one RoI: all 49 bins of a 7x7 in one
# program, a 14x14 in seven. Swept on an H100 (16 images, C=256 fp16 channels-last, 16000 RoIs at
# 7x7 and 1600 at 14x14): 64/32/4 warps 1.21 ms at 7x7, 32/32/4 0.44 ms at 14x14; 64 or 128 channels
# were 5-20% slower, 2 or 8 warps no faster.
BLOCK_BINS = 64
BLOCK_BINS_LARGE = 32  # for outputs of more than BLOCK_BINS bins
BLOCK_C = 32
NUM_WARPS = 4
INT32_MAX = 2**31 - 1

if triton is not None:

    @triton.jit
    def _pick(lvl, v0, v1, v2, v3, v4, NUM_LEVELS: tl.constexpr):
        """Level lvl's value among per-level kernel arguments (a chain of selects, no branches)."""
        v = v0
        if NUM_LEVELS > 1:
            v = tl.where(lvl == 1, v1, v)
        if NUM_LEVELS > 2:
            v = tl.where(lvl == 2, v2, v)
        if NUM_LEVELS > 3:
            v = tl.where(lvl == 3, v3, v)
        if NUM_LEVELS > 4:
            v = tl.where(lvl == 4, v4, v)
        return v

    @triton.jit
    def _axis(p, start, size, dp, n, WIDE: tl.constexpr):
        """Along one axis, for the samples at start + p * size + dp of bins p: torchvision's
        bilinear_interpolate boundary rules -> (inside, low index, high index, low weight, high weight)."""
        s = start + p.to(tl.float32) * size + dp
        inside = (s >= -1.0) & (s <= n * 1.0)  # (n * 1.0: n may be a constexpr, where a level is 1 wide)
        s = tl.where(inside, tl.maximum(s, 0.0), 0.0)  # [-1, 0] reads index 0; keeps the cast defined
        low = s.to(tl.int32)  # s >= 0: truncation is the floor
        edge = low >= n - 1  # at or past the last row: read it with weight 1
        high = tl.where(edge, n - 1, low + 1)
        low = tl.where(edge, n - 1, low)
        s = tl.where(edge, low.to(tl.float32), s)
        frac = s - low.to(tl.float32)
        if WIDE:
            low = low.to(tl.int64)
            high = high.to(tl.int64)
        return inside, low, high, 1.0 - frac, frac

    # Level sizes and the batch change with the input size: not specialized, so one compilation serves
    # every size (specialization.py says why per argument; the strides stay, see there).
    @triton.jit(do_not_specialize=["h0", "h1", "h2", "h3", "h4", "w0", "w1", "w2", "w3", "w4",
                                   "n_images"])
    def _roi_align_kernel(out_ptr, boxes_ptr, level_ptr, image_ptr,
                          f0, f1, f2, f3, f4,
                          h0, h1, h2, h3, h4, w0, w1, w2, w3, w4,
                          sn0, sn1, sn2, sn3, sn4, sc0, sc1, sc2, sc3, sc4,
                          sh0, sh1, sh2, sh3, sh4, sw0, sw1, sw2, sw3, sw4,
                          n_images, channels,
                          NUM_LEVELS: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
                          SAMPLING: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_BINS: tl.constexpr,
                          BLOCK_C: tl.constexpr, WIDE: tl.constexpr, OUT_CL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)  # r * C * OH * OW passes 2**31 at ~170k RoIs of 256 x 7 x 7
        bins = tl.program_id(1) * BLOCK_BINS + tl.arange(0, BLOCK_BINS)
        cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_bin = bins < OH * OW
        in_c = cs < channels
        lvl = tl.load(level_ptr + r).to(tl.int32)
        img = tl.load(image_ptr + r).to(tl.int32)
        ok = (lvl >= 0) & (lvl < NUM_LEVELS) & (img >= 0) & (img < n_images)
        lvl = tl.where(ok, lvl, 0)
        img = tl.where(ok, img, 0)
        height = _pick(lvl, h0, h1, h2, h3, h4, NUM_LEVELS)
        width = _pick(lvl, w0, w1, w2, w3, w4, NUM_LEVELS)
        s_c = _pick(lvl, sc0, sc1, sc2, sc3, sc4, NUM_LEVELS)
        s_h = _pick(lvl, sh0, sh1, sh2, sh3, sh4, NUM_LEVELS)
        s_w = _pick(lvl, sw0, sw1, sw2, sw3, sw4, NUM_LEVELS)
        s_n = _pick(lvl, sn0, sn1, sn2, sn3, sn4, NUM_LEVELS)
        feat = _pick(lvl, f0, f1, f2, f3, f4, NUM_LEVELS) + img.to(tl.int64) * s_n  # B*C*H*W may pass 2**31

        x1 = tl.load(boxes_ptr + r * 4 + 0)
        y1 = tl.load(boxes_ptr + r * 4 + 1)
        x2 = tl.load(boxes_ptr + r * 4 + 2)
        y2 = tl.load(boxes_ptr + r * 4 + 3)
        if ALIGNED:  # pixel centres at half coordinates: the box shifts by -0.5, keeps its size
            x1 = x1 - 0.5
            y1 = y1 - 0.5
            roi_w = (x2 - 0.5) - x1
            roi_h = (y2 - 0.5) - y1
        else:  # malformed RoIs are forced to 1 x 1
            roi_w = tl.maximum(x2 - x1, 1.0)
            roi_h = tl.maximum(y2 - y1, 1.0)
        bin_w = tl.math.div_rn(roi_w, tl.full((), OW, tl.float32))
        bin_h = tl.math.div_rn(roi_h, tl.full((), OH, tl.float32))
        if SAMPLING > 0:
            grid_h = tl.full((), SAMPLING, tl.int32)
            grid_w = tl.full((), SAMPLING, tl.int32)
        else:  # torchvision's adaptive grid: ceil(roi size / output size) samples per bin side
            grid_h = tl.math.ceil(tl.math.div_rn(roi_h, tl.full((), OH, tl.float32))).to(tl.int32)
            grid_w = tl.math.ceil(tl.math.div_rn(roi_w, tl.full((), OW, tl.float32))).to(tl.int32)
        gh = grid_h.to(tl.float32)
        gw = grid_w.to(tl.float32)

        ph = bins // OW
        pw = bins % OW
        c_off = cs * s_c
        if WIDE:
            c_off = c_off.to(tl.int64)
        live = in_bin & ok
        acc = tl.zeros([BLOCK_BINS, BLOCK_C], dtype=tl.float32)
        for iy in range(grid_h):
            dy = tl.math.div_rn((iy + 0.5) * bin_h, gh)
            in_y, y_lo, y_hi, hy, ly = _axis(ph, y1, bin_h, dy, height, WIDE)
            row_lo = y_lo * s_h
            row_hi = y_hi * s_h
            for ix in range(grid_w):
                dx = tl.math.div_rn((ix + 0.5) * bin_w, gw)
                in_x, x_lo, x_hi, hx, lx = _axis(pw, x1, bin_w, dx, width, WIDE)
                col_lo = x_lo * s_w
                col_hi = x_hi * s_w
                m = (live & in_y & in_x)[:, None] & in_c[None, :]
                v1 = tl.load(feat + (row_lo + col_lo)[:, None] + c_off[None, :], mask=m, other=0.0)
                v2 = tl.load(feat + (row_lo + col_hi)[:, None] + c_off[None, :], mask=m, other=0.0)
                v3 = tl.load(feat + (row_hi + col_lo)[:, None] + c_off[None, :], mask=m, other=0.0)
                v4 = tl.load(feat + (row_hi + col_hi)[:, None] + c_off[None, :], mask=m, other=0.0)
                # torchvision's order: ((w1 v1 + w2 v2) + w3 v3) + w4 v4, then added to the sum
                acc += ((hy * hx)[:, None] * v1.to(tl.float32) + (hy * lx)[:, None] * v2.to(tl.float32)
                        + (ly * hx)[:, None] * v3.to(tl.float32) + (ly * lx)[:, None] * v4.to(tl.float32))
        count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
        val = tl.math.div_rn(acc, count)
        if OUT_CL:  # channels-last output: a bin's channels contiguous, as the mask head's convolutions read them
            dst = out_ptr + r * (channels * OH * OW) + bins[:, None] * channels + cs[None, :]
        else:
            dst = out_ptr + r * (channels * OH * OW) + cs[None, :] * (OH * OW) + bins[:, None]
        tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=in_bin[:, None] & in_c[None, :])


def available() -> bool:
    return triton is not None


def _check(levels: list[torch.Tensor], level: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor,
           output_size: tuple[int, int] | int) -> tuple[int, int, int, int]:
    """Shapes and dtypes both implementations need -> (R, C, oh, ow); raises ValueError with the reason."""
    if not isinstance(levels, (list, tuple)) or not levels:
        raise ValueError("levels must be a non-empty list of [B, C, H, W] tensors")
    first = levels[0]
    for i, feat in enumerate(levels):
        if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
            raise ValueError(f"levels[{i}] must be a 4-D [B, C, H, W] tensor, got "
                             f"{tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__}")
        if feat.shape[:2] != first.shape[:2]:
            raise ValueError(f"levels[{i}] has [B, C] = {list(feat.shape[:2])}, levels[0] {list(first.shape[:2])}")
        if feat.dtype != first.dtype:
            raise ValueError(f"levels[{i}] is {feat.dtype}, levels[0] {first.dtype}")
        if feat.device != first.device:
            raise ValueError(f"levels[{i}] is on {feat.device}, levels[0] on {first.device}")
        if feat.shape[2] < 1 or feat.shape[3] < 1:
            raise ValueError(f"levels[{i}] has an empty spatial size {tuple(feat.shape[2:])}")
    if not first.is_floating_point():
        raise ValueError(f"levels must be floating point, got {first.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [R, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    r = boxes.shape[0]
    for name, t in (("level", level), ("image", image)):
        if t.dim() != 1 or t.shape[0] != r:
            raise ValueError(f"{name} must be [R] = [{r}], got {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    for name, t in (("level", level), ("image", image), ("boxes", boxes)):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device}, the levels on {first.device}")
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, numbers.Integral) and s > 0 for s in size):
        raise ValueError(f"output_size must be two positive ints, got {output_size!r}")
    return r, first.shape[1], int(size[0]), int(size[1])


def roi_align_levels(levels: list[torch.Tensor], level: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor,
                     output_size: tuple[int, int], sampling_ratio: int,
                     out_dtype: torch.dtype | None = None, channels_last: bool = False,
                     aligned: bool = False) -> torch.Tensor:
    """RoI Align of each RoI r from levels[level[r]][image[r]], as torchvision's roi_align(aligned=aligned,
    spatial_scale=1) would pool it from that level alone (aligned=True: detectron2's ROIAlignV2).

    levels: L <= 5 tensors [B, C, H_l, W_l] of one dtype and device, any strides (channels-last reads
    fastest). level, image: [R] integers. boxes: [R, 4] (x1, y1, x2, y2) already in level[r]'s
    coordinates. sampling_ratio > 0 samples a fixed grid per bin, <= 0 torchvision's adaptive one.
    Returns [R, C, oh, ow] in out_dtype (default: the levels' dtype), contiguous or, with channels_last,
    in that memory format (what cuDNN's fast convolutions read: no transpose for the mask head),
    computed in float32 and rounded once. One launch, no host synchronisation: capturable in a CUDA graph (after a first
    call outside the capture has compiled the kernel)."""
    if triton is None:
        raise RuntimeError("Triton is not installed: use roi_align_levels_reference")
    r, c, oh, ow = _check(levels, level, image, boxes, output_size)
    if len(levels) > MAX_LEVELS:
        raise ValueError(f"at most {MAX_LEVELS} levels, got {len(levels)}")
    first = levels[0]
    if not first.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(f"the kernel runs on CUDA tensors (or in Triton's interpreter), got {first.device}: "
                         "use roi_align_levels_reference")
    out_dtype = out_dtype or first.dtype
    out = torch.empty(r, c, oh, ow, dtype=out_dtype, device=first.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if r == 0 or c == 0:
        return out
    boxes = boxes.to(torch.float32).contiguous()
    level = level.contiguous()
    image = image.contiguous()
    # Offsets within one image's level stay in 32 bits unless a level is over 2**31 elements per image.
    wide = any(sum((n - 1) * s for n, s in zip(f.shape[1:], f.stride()[1:])) > INT32_MAX for f in levels)
    pad = [levels[0]] * (MAX_LEVELS - len(levels))  # unused pointer slots, never selected
    feats = list(levels) + pad
    args = [f.shape[2] for f in feats] + [f.shape[3] for f in feats]
    # A dimension of size 1 is only ever read at index 0, so its stride is any number: PyTorch gives 1 there
    # (a 1 x 1 level, or one image) and Triton would make that a constant, a new variant of the kernel at
    # the input size (or batch) that has such a level. 0 keys as every other stride of a channels-last level.
    for dim in (0, 1, 2, 3):
        args += [f.stride(dim) if f.shape[dim] != 1 else 0 for f in feats]
    block_c = min(BLOCK_C, triton.next_power_of_2(c))
    block_bins = min(BLOCK_BINS if oh * ow <= BLOCK_BINS else BLOCK_BINS_LARGE, triton.next_power_of_2(oh * ow))
    grid = (r, triton.cdiv(oh * ow, block_bins), triton.cdiv(c, block_c))
    # No fused multiply-adds: the sample positions and the bilinear sums round as torchvision's do.
    # Triton launches on the current device: make it the levels' one.
    with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
        _roi_align_kernel[grid](out, boxes, level, image, *feats, *args, first.shape[0], c,
                                NUM_LEVELS=len(levels), OH=oh, OW=ow, SAMPLING=max(int(sampling_ratio), 0),
                                ALIGNED=bool(aligned), BLOCK_BINS=block_bins, BLOCK_C=block_c, WIDE=wide,
                                OUT_CL=bool(channels_last), num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def roi_align_levels_reference(levels: list[torch.Tensor], level: torch.Tensor, image: torch.Tensor,
                               boxes: torch.Tensor, output_size: tuple[int, int], sampling_ratio: int,
                               out_dtype: torch.dtype | None = None, aligned: bool = False) -> torch.Tensor:
    """roi_align_levels with torchvision's roi_align, one call per level on its float32 copy (so any
    device, and the definition the kernel is tested against). Syncs with the host to split the RoIs."""
    r, c, oh, ow = _check(levels, level, image, boxes, output_size)
    first = levels[0]
    out_dtype = out_dtype or first.dtype
    out = torch.zeros(r, c, oh, ow, dtype=out_dtype, device=first.device)
    if r == 0:
        return out
    rois = torch.cat([image.to(torch.float32)[:, None], boxes.to(torch.float32)], 1)
    known = (image >= 0) & (image < first.shape[0])
    for lvl, feat in enumerate(levels):
        idx = ((level == lvl) & known).nonzero()[:, 0]
        if idx.numel():
            pooled = roi_align(feat.float(), rois[idx], (oh, ow), spatial_scale=1.0,
                               sampling_ratio=int(sampling_ratio), aligned=bool(aligned))
            out[idx] = pooled.to(out_dtype)
    return out
