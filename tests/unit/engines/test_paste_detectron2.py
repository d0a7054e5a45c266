"""detectron2's mask paste (semantics paste="detectron2"): the Triton paste kernel, run in Triton's
interpreter on the CPU, and the torch path of mask_rle.paste_transitions give the same change positions,
and through rle_strings the same strings as a plain implementation of detectron2's CPU paste
(tests/d2_reference.paste: F.grid_sample at pixel centres over the box's region, >= threshold), for
fractional boxes, boxes touching or crossing the image's edges, tiny, empty and image-sized ones,
random and smooth probabilities, float16 masks, another threshold, and a batch pasted in groups."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dd.worker.engines.masks import rle_encode
from dd.worker.engines.masks import paste_and_encode, paste_transitions, rle_strings
from tests import d2_reference

REPO = Path(__file__).resolve().parents[3]


def cases(seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor, int, int, float]]:
    """(name, masks, boxes, height, width, threshold)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    height, width, n = 97, 131, 48
    masks = torch.rand(n, 28, 28, generator=g)
    masks[::3] = torch.nn.functional.avg_pool2d(masks[::3, None], 5, 1, 2)[:, 0] * 1.6 - 0.3
    x0 = torch.rand(n, generator=g) * width - 5
    y0 = torch.rand(n, generator=g) * height - 5
    size = 2 ** (torch.rand(n, generator=g) * 8.5) - 0.95
    boxes = torch.stack([x0, y0, x0 + size, y0 + size * (0.3 + torch.rand(n, generator=g))], 1)
    # detectron2's final boxes are clipped to the image; some here are not, which it pastes the same way
    boxes[n // 2:, 0::2] = boxes[n // 2:, 0::2].clamp(0, width)
    boxes[n // 2:, 1::2] = boxes[n // 2:, 1::2].clamp(0, height)
    boxes[0] = torch.tensor([0.0, 0.0, width, height])  # the whole image
    boxes[1] = torch.tensor([40.25, 30.5, 40.375, 30.75])  # well under a pixel
    boxes[2] = torch.tensor([0.0, 10.3, 17.8, 60.1])  # touching the left edge
    boxes[3] = torch.tensor([width - 12.6, height - 9.2, width, height])  # the bottom-right corner
    boxes[4] = torch.tensor([-30.0, 10.0, width + 30.0, 50.0])  # wider than the image
    boxes[5] = torch.tensor([20.0, 20.0, 20.0, 50.0])  # empty: nothing
    boxes[6] = torch.tensor([width + 5.0, 10.0, width + 40.0, 50.0])  # beyond the right edge: nothing
    boxes[7] = torch.tensor([-40.0, -30.0, -0.5, -0.25])  # above and left of the image
    boxes[8] = torch.tensor([64.0, 32.0, 96.0, 64.0])  # integer corners
    masks[9] = 1.0  # full: runs that wrap from one column into the next
    masks[10] = 0.0
    out.append(("all kinds", masks, boxes, height, width, 0.5))
    out.append(("float16", masks.half(), boxes, height, width, 0.5))
    out.append(("14 x 14, threshold 0.3", torch.rand(n, 14, 14, generator=g), boxes, height, width, 0.3))
    # a bigger image with many instances, as a batch of detections
    height, width, n = 180, 240, 60
    x0, y0 = torch.rand(n, generator=g) * width, torch.rand(n, generator=g) * height
    size = 2 ** (torch.rand(n, generator=g) * 8)
    boxes = torch.stack([x0, y0, (x0 + size).clamp(max=width), (y0 + 0.7 * size).clamp(max=height)], 1)
    out.append(("many", torch.rand(n, 28, 28, generator=g), boxes, height, width, 0.5))
    return out


def _changes(pair: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[int, int]]:
    return sorted(zip(pair[0].tolist(), pair[1].tolist()))


@pytest.mark.parametrize("index", range(4))
def test_torch_path_is_detectron2s_paste(index: int) -> None:
    name, masks, boxes, height, width, threshold = cases()[index]
    expected = rle_encode(d2_reference.paste(masks.float(), boxes, height, width, threshold))
    inst, pos = paste_transitions(masks, boxes, height, width, threshold, kernel=False, rule="detectron2")
    assert rle_strings(inst, pos, len(masks), height, width) == expected, name
    assert paste_and_encode(masks, boxes.numpy(), height, width, threshold, rule="detectron2") == expected, name
    # in small chunks: each chunk on its own canvas, the answers in instance order
    small = paste_transitions(masks, boxes, height, width, threshold, max_elements=1 << 12, kernel=False,
                              rule="detectron2")
    assert _changes(small) == _changes((inst, pos)), name


def test_detectron2_paste_differs_from_torchvisions() -> None:
    """The rule matters: the same masks and boxes pasted by torchvision's rule give other masks."""
    _, masks, boxes, height, width, threshold = cases()[0]
    d2 = paste_and_encode(masks, boxes, height, width, threshold, rule="detectron2")
    keep = (boxes[:, 2] > boxes[:, 0] + 1) & (boxes[:, 0] >= 0) & (boxes[:, 2] <= width)
    tv = paste_and_encode(masks[keep], boxes[keep], height, width, threshold)
    assert sum(a != b for a, b in zip([d2[i] for i in keep.nonzero()[:, 0].tolist()], tv)) > len(tv) // 2


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="detectron2"):
        paste_transitions(torch.zeros(1, 28, 28), np.zeros((1, 4), np.float32), 10, 10, rule="pil")


SCRIPT = r"""
import torch

from dd.worker.engines.kernels import paste as paste_kernel
from dd.worker.engines.masks import paste_transitions, rle_strings
from dd.worker.engines.masks import rle_encode
from tests import d2_reference
from tests.unit.engines.test_paste_detectron2 import _changes, cases

for name, masks, boxes, height, width, threshold in cases():
    kernel = paste_transitions(masks, boxes, height, width, threshold, kernel=True, rule="detectron2")
    torch_path = paste_transitions(masks, boxes, height, width, threshold, kernel=False, rule="detectron2")
    assert _changes(kernel) == _changes(torch_path), name
    expected = rle_encode(d2_reference.paste(masks.float(), boxes, height, width, threshold))
    assert rle_strings(*kernel, len(masks), height, width, presorted=True) == expected, name
    if name == "all kinds":
        assert kernel[0].numel() and not ((kernel[0] >= 5) & (kernel[0] <= 7)).any()  # nothing of 5-7
# in groups, one launch each
name, masks, boxes, height, width, threshold = cases()[3]
whole = _changes(paste_transitions(masks, boxes, height, width, threshold, kernel=True, rule="detectron2"))
paste_kernel.MAX_SLOTS = 3000
assert _changes(paste_transitions(masks, boxes, height, width, threshold, kernel=True, rule="detectron2")) == whole
# nothing of any instance in the image: no launch, nothing back
none = paste_transitions(torch.ones(2, 28, 28), torch.tensor([[-9.0, -9.0, -3.0, -2.0], [5.0, 5.0, 5.0, 9.0]]),
                         40, 50, kernel=True, rule="detectron2")
assert none[0].numel() == 0 and none[1].numel() == 0
print("ok")
"""


def test_triton_paste_kernel_is_detectron2s_paste() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900,
                         cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
