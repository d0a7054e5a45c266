"""Memory-bound elementwise passes over channels-last tensors, as Triton kernels.

A profile of the fast engine (R50-FPN, batch 16, 800x1344, fp16, channels-last, H100) showed
PyTorch's generic kernels doing badly on channels-last tensors where the work is pure memory
traffic:

- a convolution's bias, added separately (`x.add_(bias[None, :, None, None])`), runs as a
  broadcasting strided kernel: 0.77 ms on [16, 256, 192, 336] fp16, a fraction of the ~3 TB/s
  the card moves;
- the FPN top-down step (`inner = lateral + bias; inner = inner + F.interpolate(top, size,
  mode="nearest")`) costs bias add 0.77 ms + upsample_nearest2d 1.64 ms + add 0.52 ms at the
  largest level, three passes and two temporaries where one pass will do;
- the stem's `F.max_pool2d(x, 3, 2, 1)` on [16, 64, 384, 672] takes 1.1 ms because CUDA's
  max_pool2d always computes (and writes) int64 indices too.

A channels-last [N, C, H, W] tensor is physically a row-major [N*H*W, C] matrix, so each kernel
here works on tiles of BLOCK_W pixels x BLOCK_C channels: every pixel's channels are contiguous
(loads and stores vectorize to 16 bytes and coalesce), per-pixel index arithmetic is done once per
row of the tile and per-channel data (the bias) once per column, and there are no per-element
divisions. Element offsets are 64-bit (N*H*W*C passes 2**31 for a batch of large feature maps).

Each kernel gives exactly PyTorch's values: tests/unit/engines/test_cl_kernels.py checks that bit for bit in
Triton's interpreter, and on an H200 (PyTorch 2.11, Triton 3.6) they equalled PyTorch's CUDA ops
for float16, bfloat16 and float32, FPN-sized tensors included, and replayed in a CUDA graph:
- additions of fp16/bf16 tensors are done as PyTorch does them: in float32, rounded once to the
  tensor's dtype per PyTorch operation (so upsample_add rounds twice, like the two adds it fuses);
- the nearest source index is PyTorch's legacy "nearest" rule (aten/src/ATen/native/UpSample.h
  nearest_idx, cuda/UpSample.cuh nearest_neighbor_compute_source_index):
  scale = float32(in) / float32(out) rounded to float32, src = min(int(floorf(float32(dst) *
  scale)), in - 1), which is not always floor(dst * in / out) (14 -> 46 maps row 23 to 6, not 7). The scale is computed on the host with IEEE float32 division (Triton's `/`
  on float32 is not correctly rounded on the GPU), the product in the kernel is a single IEEE
  float32 multiply, and for non-negative values truncation is floor. For out == in and
  out == 2 * in (where PyTorch's CPU code skips the float arithmetic) this gives dst and
  dst // 2 too, since the scale is then exactly 1 or 0.5;
- max pooling keeps PyTorch's comparison `val > max || isnan(val)` in PyTorch's window order
  (row by row, left to right), so a NaN in the window propagates and ties (+0 / -0) resolve alike.

Every public function validates its arguments (ValueError says what to pass), runs the kernel for
channels-last contiguous CUDA tensors (or CPU tensors in Triton's interpreter, TRITON_INTERPRET=1)
and otherwise the plain-torch *_reference function with the same semantics. Nothing syncs with the
host, so all three can be captured in a CUDA graph (after a first call has compiled the kernel).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None

# A program handles a tile of about TILE elements: BLOCK_C channels (a power of two, the whole of
# C up to MAX_BLOCK_C) times as many pixels as make up TILE. Swept on an H200 (PyTorch 2.11,
# Triton 3.6; fp16, batch 16): bias add on [16, 256, 192, 336] 251 us (4.2 TB/s; PyTorch's add_
# 698 us), the FPN step to that level from [16, 256, 96, 168] 283 us (PyTorch's three kernels
# 2543 us); 4096-element tiles or 4 warps were 2-5% slower, 8192 no faster.
TILE = 2048
MAX_BLOCK_C = 256
NUM_WARPS = 8
# The max pool's tiles count output elements (each the max of nine inputs); a program makes
# POOL_ROWS output rows, reading 2 * POOL_ROWS + 1 input rows instead of 3 * POOL_ROWS. On
# [16, 64, 384, 672]: 197 us (PyTorch's max_pool2d 1072 us); one row a tile 237 us, two 207 us.
POOL_TILE = 1024
POOL_NUM_WARPS = 4
POOL_ROWS = 4
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if triton is not None:

    @triton.jit(do_not_specialize=["rows"])  # sizes: one compilation for all (specialization.py)
    def _bias_add_kernel(x_ptr, b_ptr, rows, C,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
        """x[r, c] += b[c] for r < rows, c < C, in float32, rounded once to x's dtype."""
        r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_c = c < C
        if EVEN_C:
            b = tl.load(b_ptr + c)
            mask = (r < rows)[:, None]
        else:
            b = tl.load(b_ptr + c, mask=in_c, other=0.0)
            mask = (r < rows)[:, None] & in_c[None, :]
        off = r[:, None] * C + c[None, :]
        x = tl.load(x_ptr + off, mask=mask)
        y = x.to(tl.float32) + b.to(tl.float32)[None, :]
        tl.store(x_ptr + off, y.to(x_ptr.dtype.element_ty), mask=mask)

    # Sizes are not specialized: one compilation for all (specialization.py).
    @triton.jit(do_not_specialize=["H", "W", "h", "w", "n_wblocks"])
    def _upsample_add_kernel(lat_ptr, top_ptr, b_ptr, out_ptr, H, W, h, w, C, scale_h, scale_w, n_wblocks,
                             HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                             EVEN_C: tl.constexpr):
        """One program: BLOCK_W pixels of output row (n, y), BLOCK_C channels.
        out = round(round(lat + b) + top[n, :, sy, sx]), each round to the tensors' dtype."""
        pid = tl.program_id(0)
        wb = pid % n_wblocks
        row = pid // n_wblocks  # n * H + y
        y = row % H
        n = row // H
        sy = tl.minimum((y.to(tl.float32) * scale_h).to(tl.int32), h - 1)
        x = wb * BLOCK_W + tl.arange(0, BLOCK_W)
        sx = tl.minimum((x.to(tl.float32) * scale_w).to(tl.int32), w - 1)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_c = c < C
        if EVEN_C:
            mask = (x < W)[:, None]
        else:
            mask = (x < W)[:, None] & in_c[None, :]
        dst = (row.to(tl.int64) * W + x)[:, None] * C + c[None, :]
        src = ((n * h + sy).to(tl.int64) * w + sx)[:, None] * C + c[None, :]
        v = tl.load(lat_ptr + dst, mask=mask)
        if HAS_BIAS:
            b = tl.load(b_ptr + c, mask=in_c, other=0.0).to(tl.float32)
            v = (v.to(tl.float32) + b[None, :]).to(lat_ptr.dtype.element_ty)
        t = tl.load(top_ptr + src, mask=mask)
        out = v.to(tl.float32) + t.to(tl.float32)
        tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _nan_max(m, v):
        """PyTorch's max-pool step: v replaces m when greater or NaN, so a NaN stays once seen (the last
        NaN in window order wins, else the first of equal maxima). Folding rows' results with it gives
        the fold of the whole window in PyTorch's row-major order."""
        return tl.where((v > m) | (v != v), v, m)

    @triton.jit
    def _pool_row(x_ptr, n, iy, H, W, C, ox, in_x, c, in_c, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                  EVEN_C: tl.constexpr):
        """The max over columns 2*ox-1 .. 2*ox+1 of input row iy (-inf where all are padding)."""
        base = (n * H + iy).to(tl.int64) * W
        row_ok = (iy >= 0) & (iy < H)
        m = tl.full([BLOCK_W, BLOCK_C], float("-inf"), tl.float32).to(x_ptr.dtype.element_ty)
        for kw in tl.static_range(3):
            ix = ox * 2 - 1 + kw
            ok = in_x & (ix >= 0) & (ix < W) & row_ok
            if EVEN_C:
                mask = ok[:, None]
            else:
                mask = ok[:, None] & in_c[None, :]
            v = tl.load(x_ptr + (base + ix)[:, None] * C + c[None, :], mask=mask, other=float("-inf"))
            m = _nan_max(m, v)
        return m

    # Sizes are not specialized: one compilation for all (specialization.py).
    @triton.jit(do_not_specialize=["H", "W", "Ho", "Wo", "n_wblocks", "n_yblocks"])
    def _max_pool_kernel(x_ptr, out_ptr, H, W, Ho, Wo, C, n_wblocks, n_yblocks, ROWS: tl.constexpr,
                         BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
        """One program: output rows oy0 .. oy0 + ROWS - 1 of image n, BLOCK_W pixels, BLOCK_C channels;
        output (oy, ox) is the max of the 3x3 window at (2*oy - 1, 2*ox - 1) clipped to the image
        (padding never wins). Input rows 2*oy+1 are shared by consecutive output rows, so a program
        reads 2 * ROWS + 1 rows instead of 3 * ROWS."""
        pid = tl.program_id(0)
        wb = pid % n_wblocks
        t = pid // n_wblocks
        oy0 = (t % n_yblocks) * ROWS
        n = t // n_yblocks
        ox = wb * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_c = c < C
        in_x = ox < Wo
        if EVEN_C:
            mask = in_x[:, None]
        else:
            mask = in_x[:, None] & in_c[None, :]
        top = _pool_row(x_ptr, n, oy0 * 2 - 1, H, W, C, ox, in_x, c, in_c, BLOCK_W, BLOCK_C, EVEN_C)
        for k in tl.static_range(ROWS):
            oy = oy0 + k
            mid = _pool_row(x_ptr, n, oy * 2, H, W, C, ox, in_x, c, in_c, BLOCK_W, BLOCK_C, EVEN_C)
            bottom = _pool_row(x_ptr, n, oy * 2 + 1, H, W, C, ox, in_x, c, in_c, BLOCK_W, BLOCK_C, EVEN_C)
            out = _nan_max(_nan_max(top, mid), bottom)
            dst = ((n * Ho + oy).to(tl.int64) * Wo + ox)[:, None] * C + c[None, :]
            tl.store(out_ptr + dst, out, mask=mask & (oy < Ho))
            top = bottom


def available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # pragma: no cover - older Triton


def use_kernel(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run for these tensors (all channels-last contiguous, Triton there,
    on CUDA or, in Triton's interpreter, on the CPU); otherwise the torch references run."""
    if triton is None or not all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return False
    return all(t.is_cuda for t in tensors) or (_interpreting() and all(t.device.type == "cpu" for t in tensors))


def _blocks(c: int, tile: int) -> tuple[int, int]:
    """(pixels, channels) of a tile: all of C up to MAX_BLOCK_C, pixels to make up about `tile`
    elements. Not fewer pixels for a narrow image: the tile is a constexpr, and one that followed the
    width would compile a new variant of the kernel at a new input size (the extra pixels are masked)."""
    block_c = min(triton.next_power_of_2(c), MAX_BLOCK_C)
    return max(1, tile // block_c), block_c


@functools.lru_cache(maxsize=256)
def _nearest_scale(src: int, dst: int) -> float:
    """PyTorch's nearest scale, float(src) / dst in float32 (IEEE division on the host, exact as a
    Python float; Triton passes it to the kernel as that same float32)."""
    return float(torch.tensor(float(src), dtype=torch.float32) / torch.tensor(float(dst), dtype=torch.float32))


def _check_4d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D [N, C, H, W] tensor (channels-last for speed), "
                         f"got {type(t).__name__} {tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def _check_bias(bias: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != x.shape[1]:
        raise ValueError(f"bias must be a 1-D tensor of C={x.shape[1]} values, got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if not bias.is_floating_point():
        raise ValueError(f"bias must be a floating-point tensor, got {bias.dtype}")
    if bias.device != x.device:
        raise ValueError(f"bias must be on the tensor's device {x.device}, got {bias.device}")


def _kernel_bias(bias: torch.Tensor) -> torch.Tensor:
    """The bias as the kernels read it: its own dtype when that converts to float32 exactly in the
    kernel, else float32 (float64 is rounded to float32 first)."""
    if bias.dtype not in KERNEL_DTYPES:
        bias = bias.to(torch.float32)
    return bias.contiguous()


# --- bias add ----------------------------------------------------------------------------------


def bias_add_reference_(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x += bias[None, :, None, None] in place, in float32 and rounded once to x's dtype: exactly
    `x.add_(bias.view(1, -1, 1, 1))` for a float16/bfloat16/float32 bias (PyTorch adds half and
    bfloat16 in float32); a float64 bias is rounded to float32 first."""
    return x.add_(bias.to(torch.float32).view(1, -1, 1, 1))


def bias_add_(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x += bias[None, :, None, None] in place for a 4-D float16/bfloat16/float32 x; returns x.
    One vectorized pass when x is channels-last contiguous (bias_add_reference_ otherwise), with
    bias_add_reference_'s values."""
    _check_4d("x", x)
    _check_bias(bias, x)
    if not use_kernel(x) or x.numel() == 0:
        return bias_add_reference_(x, bias)
    n, c, h, w = x.shape
    rows = n * h * w
    block_m, block_c = _blocks(c, TILE)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(c, block_c))
    _bias_add_kernel[grid](x, _kernel_bias(bias), rows, c, BLOCK_M=block_m, BLOCK_C=block_c,
                           EVEN_C=c % block_c == 0, num_warps=NUM_WARPS)
    return x


# --- FPN top-down step -------------------------------------------------------------------------


def upsample_add_reference(lateral: torch.Tensor, top: torch.Tensor, bias: torch.Tensor | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """(lateral + bias, rounded to lateral's dtype) + F.interpolate(top, size=(H, W), mode="nearest"),
    rounded again: the FPN's `inner = lateral_conv(x)` (bias added on its own) then
    `inner = inner + F.interpolate(top, ...)`. Written into out when given; channels-last."""
    y = lateral if bias is None else bias_add_reference_(lateral.clone(), bias)
    y = y + F.interpolate(top, size=(lateral.shape[2], lateral.shape[3]), mode="nearest")
    y = y.contiguous(memory_format=torch.channels_last)
    return y if out is None else out.copy_(y)


def upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The FPN top-down step in one pass: out = (lateral + bias) + nearest-upsample(top) to
    lateral's H x W, with upsample_add_reference's values (two roundings, PyTorch's index rule).

    lateral [N, C, H, W] and top [N, C, h, w] of one dtype (float16/bfloat16/float32), bias [C]
    or None, out [N, C, H, W] of lateral's dtype or None (a new channels-last tensor). out may be
    lateral itself (in place) but must not overlap top."""
    _check_4d("lateral", lateral)
    _check_4d("top", top)
    n, c, hh, ww = lateral.shape
    if top.dtype != lateral.dtype or top.device != lateral.device:
        raise ValueError(f"top must have lateral's dtype and device ({lateral.dtype}, {lateral.device}), "
                         f"got {top.dtype}, {top.device}")
    if top.shape[0] != n or top.shape[1] != c or top.shape[2] == 0 or top.shape[3] == 0:
        raise ValueError(f"top must be [N={n}, C={c}, h>0, w>0] like lateral {tuple(lateral.shape)}, "
                         f"got {tuple(top.shape)}")
    if bias is not None:
        _check_bias(bias, lateral)
    if out is not None:
        if (not isinstance(out, torch.Tensor) or out.shape != lateral.shape or out.dtype != lateral.dtype
                or out.device != lateral.device):
            raise ValueError(f"out must be a {lateral.dtype} tensor of lateral's shape {tuple(lateral.shape)} "
                             f"on {lateral.device} (channels-last for speed), or None")
    if out is None and use_kernel(lateral, top):
        out = torch.empty_like(lateral, memory_format=torch.channels_last)
    if out is None or not use_kernel(lateral, top, out) or lateral.numel() == 0:
        return upsample_add_reference(lateral, top, bias, out)
    h, w = top.shape[2], top.shape[3]
    block_w, block_c = _blocks(c, TILE)
    n_wblocks = triton.cdiv(ww, block_w)
    grid = (n * hh * n_wblocks, triton.cdiv(c, block_c))
    b = _kernel_bias(bias) if bias is not None else lateral
    _upsample_add_kernel[grid](lateral, top, b, out, hh, ww, h, w, c, _nearest_scale(h, hh), _nearest_scale(w, ww),
                               n_wblocks, HAS_BIAS=bias is not None, BLOCK_W=block_w, BLOCK_C=block_c,
                               EVEN_C=c % block_c == 0, num_warps=NUM_WARPS)
    return out


# --- stem max pool -----------------------------------------------------------------------------


def max_pool_3x3_s2_reference(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 3, 2, 1) (ceil_mode off), as a channels-last tensor."""
    return F.max_pool2d(x, 3, 2, 1).contiguous(memory_format=torch.channels_last)


def max_pool_3x3_s2(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, kernel_size=3, stride=2, padding=1) of a 4-D float16/bfloat16/float32 tensor
    as a channels-last tensor, without the int64 indices CUDA's max_pool2d always writes; the same
    values (NaN in a window propagates). Channels-last contiguous x runs the kernel, anything else
    max_pool_3x3_s2_reference."""
    _check_4d("x", x)
    n, c, hh, ww = x.shape
    if hh == 0 or ww == 0:
        raise ValueError(f"x must have H, W > 0, got {tuple(x.shape)}")
    if not use_kernel(x) or x.numel() == 0:
        return max_pool_3x3_s2_reference(x)
    ho, wo = (hh - 1) // 2 + 1, (ww - 1) // 2 + 1
    out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    block_w, block_c = _blocks(c, POOL_TILE)
    n_wblocks = triton.cdiv(wo, block_w)
    n_yblocks = triton.cdiv(ho, POOL_ROWS)
    grid = (n * n_yblocks * n_wblocks, triton.cdiv(c, block_c))
    _max_pool_kernel[grid](x, out, hh, ww, ho, wo, c, n_wblocks, n_yblocks, ROWS=POOL_ROWS, BLOCK_W=block_w,
                           BLOCK_C=block_c, EVEN_C=c % block_c == 0, num_warps=POOL_NUM_WARPS)
    return out
