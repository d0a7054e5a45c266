"""The multi-level RoI Align kernel, run in Triton's interpreter on the CPU (CI has no GPU): each RoI
pooled as torchvision's roi_align pools it from its own level alone, aligned=False (torchvision's
Mask R-CNN) and aligned=True with the adaptive grid (detectron2's ROIAlignV2), for float32 and float16
levels, channels-last and contiguous, boxes inside, across and beyond a level's edges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import roi_align

from dd.worker.engines.kernels.roi_align import roi_align_levels, roi_align_levels_reference

REPO = Path(__file__).resolve().parents[3]

SIZES = [(20, 24), (10, 12), (5, 6), (3, 3)]  # (H, W) of the four levels


def per_level(levels: list[torch.Tensor], level: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor,
              output_size: tuple[int, int], sampling_ratio: int, aligned: bool = False) -> torch.Tensor:
    """The definition: each RoI through torchvision's roi_align on its level's float32 upcast alone."""
    rows = []
    for lvl, img, box in zip(level.tolist(), image.tolist(), boxes):
        roi = torch.cat([torch.tensor([0.0]), box.float()])[None]
        rows.append(roi_align(levels[lvl][img:img + 1].float(), roi, output_size, 1.0, sampling_ratio, aligned))
    return torch.cat(rows)


def make_case(c: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 images, 4 levels of C channels; on every level, boxes inside, across and beyond its edges,
    tiny and degenerate ones, in that level's coordinates."""
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(2, c, h, w, generator=g) for h, w in SIZES]
    rows = []
    for lvl, (h, w) in enumerate(SIZES):
        for x1, y1, x2, y2 in [
            (0.3 * w, 0.2 * h, 0.8 * w, 0.9 * h),  # inside
            (0.0, 0.0, w, h),  # the whole level: samples up to its bottom and right edges
            (0.5 * w, 0.4 * h, w + 3.7, h + 2.2),  # across the bottom-right edge, partly beyond it
            (-3.0, -2.5, 0.4 * w, 0.6 * h),  # across the top-left edge, samples in [-1, 0] and below -1
            (-9.0, 0.2 * h, -1.5, 0.7 * h),  # wholly left of x = -1: zeros
            (w + 1.5, 0.1 * h, w + 6.0, 0.5 * h),  # wholly right of W: zeros
            (w - 1.0, h - 1.0, w - 0.6, h - 0.2),  # tiny, on the last row and column
            (0.41 * w, 0.52 * h, 0.41 * w + 0.05, 0.52 * h + 0.03),  # tiny: forced to 1 x 1
            (0.7 * w, 0.6 * h, 0.2 * w, 0.1 * h),  # x2 < x1, y2 < y1: forced to 1 x 1
            (0.5 * w, 0.5 * h, 0.5 * w, 0.5 * h),  # a point
            (-1.25, -1.25, 5.75, 5.75),  # 7 x 7 bins of 1: samples at -1 and 0 exactly
            (w - 6.75, h - 6.75, w + 0.25, h + 0.25),  # and at W and H exactly
        ]:
            rows.append((lvl, len(rows) % 2, x1, y1, x2, y2))
    for _ in range(8):  # random boxes up to twice a level's size, anywhere around it
        lvl = int(torch.randint(0, 4, (), generator=g))
        h, w = SIZES[lvl]
        xy = (torch.rand(2, generator=g) * 1.6 - 0.3) * torch.tensor([w, h])
        wh = torch.rand(2, generator=g) * 2 * torch.tensor([w, h])
        rows.append((lvl, len(rows) % 2, *xy.tolist(), *(xy + wh).tolist()))
    table = torch.tensor(rows, dtype=torch.float64)
    return levels, table[:, 0].long(), table[:, 1].to(torch.int32), table[:, 2:].float()


SCRIPT = r"""
import platform
import sys

import torch

from tests.unit.engines.test_roi_align_kernel import make_case, per_level
from dd.worker.engines.kernels import roi_align as kernel

exact = platform.machine().lower() in ("x86_64", "amd64")  # torchvision's CPU kernel without FMAs
# The interpreter's time goes by programs, not elements: one program per RoI here, several below.
kernel.BLOCK_BINS = kernel.BLOCK_BINS_LARGE = 256
levels32, level, image, boxes = make_case(c=8)
levels16 = [f.half() for f in levels32]
# (dtype, channels-last, output size, sampling ratio, out dtype, aligned): every pair of options at least
# once; aligned with the adaptive grid (ratio 0) is detectron2's ROIAlignV2
cases = [
    (torch.float32, True, (7, 7), 2, None, False),
    (torch.float32, False, (14, 14), 2, None, False),
    (torch.float32, True, (14, 14), 0, None, False),
    (torch.float32, False, (7, 7), 0, None, False),
    (torch.float16, True, (7, 7), 2, torch.float32, False),
    (torch.float16, False, (14, 14), 2, torch.float32, False),
    (torch.float16, True, (14, 14), 0, None, False),
    (torch.float16, False, (7, 7), 0, torch.float32, False),
    (torch.float32, True, (7, 7), 0, None, True),
    (torch.float32, False, (14, 14), 0, None, True),
    (torch.float16, True, (14, 14), 0, torch.float32, True),
    (torch.float16, False, (7, 7), 0, None, True),
    (torch.float32, True, (7, 7), 2, None, True),
]
for dtype, channels_last, size, ratio, out_dtype, aligned in cases:
    feats = levels32 if dtype == torch.float32 else levels16
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    got = kernel.roi_align_levels(feats, level, image, boxes, size, ratio, out_dtype, aligned=aligned)
    want = per_level(feats, level, image, boxes, size, ratio, aligned)  # on the float32 upcast of the same values
    case = (dtype, channels_last, size, ratio, out_dtype, aligned)
    assert got.shape == want.shape and got.is_contiguous(), case
    assert got.dtype == (out_dtype or dtype), case
    if got.dtype == torch.float32:
        err = (got - want).abs().max().item()
        assert err <= 1e-5, (case, err)
        assert not exact or torch.equal(got, want), (case, err)
    else:  # float32 sums rounded once to float16
        torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3, msg=str(case))
        assert not exact or torch.equal(got, want.half()), case
    assert (got[4:48:12] == 0).all() and (got[5:48:12] == 0).all(), case  # boxes wholly beyond the edges

# several programs per RoI along the bins and the channels, and indices outside the batch: zeros
levels, level, image, boxes = make_case(c=16, seed=1)
level, image, boxes = level[::3], image[::3], boxes[::3]  # both images, all levels
feats = [f.half().contiguous(memory_format=torch.channels_last) for f in levels]
kernel.BLOCK_BINS, kernel.BLOCK_C = 32, 8  # 2 x 2 programs per RoI, the second bin block part empty
level[3], image[7] = 4, 2
got = kernel.roi_align_levels(feats, level, image, boxes, (7, 7), 2, torch.float32)
keep = torch.ones(len(level), dtype=torch.bool)
keep[[3, 7]] = False
want = per_level(feats, level[keep], image[keep], boxes[keep], (7, 7), 2)
assert (got[~keep] == 0).all()
assert (got[keep] - want).abs().max().item() <= 1e-5
assert torch.equal(got, kernel.roi_align_levels_reference(feats, level, image, boxes, (7, 7), 2, torch.float32))
v2 = kernel.roi_align_levels(feats, level, image, boxes, (7, 7), 0, torch.float32, aligned=True)
want = kernel.roi_align_levels_reference(feats, level, image, boxes, (7, 7), 0, torch.float32, aligned=True)
assert (v2[~keep] == 0).all() and (v2 - want).abs().max().item() <= 1e-5
# the same values written channels-last (the mask head's layout), several blocks of bins and channels
got_cl = kernel.roi_align_levels(feats, level, image, boxes, (7, 7), 2, torch.float32, channels_last=True)
assert got_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(got_cl, got)

empty = kernel.roi_align_levels(feats, level[:0], image[:0], boxes[:0], (14, 14), 2)
assert empty.shape == (0, 16, 14, 14) and empty.dtype == torch.float16
print("ok")
"""


def test_kernel_is_torchvision_roi_align_per_level() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_is_per_level_roi_align(dtype: torch.dtype) -> None:
    levels, level, image, boxes = make_case(c=8, seed=2)
    levels = [f.to(dtype).contiguous(memory_format=torch.channels_last) for f in levels]
    for size, ratio, aligned in (((7, 7), 2, False), ((14, 14), 0, False), ((7, 7), 0, True)):
        got = roi_align_levels_reference(levels, level, image, boxes, size, ratio, torch.float32, aligned)
        assert torch.equal(got, per_level(levels, level, image, boxes, size, ratio, aligned))
        if aligned:  # half a pixel makes a difference
            assert not torch.equal(got, per_level(levels, level, image, boxes, size, ratio))
        rounded = roi_align_levels_reference(levels, level, image, boxes, size, ratio, aligned=aligned)
        assert rounded.dtype == dtype and torch.equal(rounded, got.to(dtype))
    empty = roi_align_levels_reference(levels, level[:0], image[:0], boxes[:0], (7, 7), 2)
    assert empty.shape == (0, 8, 7, 7)


def test_bad_input_is_refused() -> None:
    levels, level, image, boxes = make_case(c=8)
    size = (7, 7)
    for fn in (roi_align_levels, roi_align_levels_reference):
        bad = [
            ([levels[0], levels[1][:, :4]], level, image, boxes, size, "[B, C]"),  # C differs
            ([levels[0], levels[1][:1]], level, image, boxes, size, "[B, C]"),  # B differs
            ([levels[0], levels[1].half()], level, image, boxes, size, "levels[0] torch.float32"),
            ([levels[0][0]], level, image, boxes, size, "4-D"),
            ([], level, image, boxes, size, "non-empty"),
            (levels, level[:-1], image, boxes, size, "level must be [R]"),
            (levels, level, image.float(), boxes, size, "image must be an integer"),
            (levels, level, image, boxes[:, :3], size, "boxes must be [R, 4]"),
            (levels, level, image, boxes, (7, 0), "output_size"),
        ]
        for feats, lvl, img, bx, sz, message in bad:
            with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
                fn(feats, lvl, img, bx, sz, 2)


def test_kernel_refuses_cpu_tensors_outside_the_interpreter() -> None:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs CPU tensors")
    levels, level, image, boxes = make_case(c=8)
    with pytest.raises(ValueError, match="roi_align_levels_reference"):
        roi_align_levels(levels, level, image, boxes, (7, 7), 2)
