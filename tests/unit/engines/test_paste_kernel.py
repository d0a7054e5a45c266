"""The Triton paste kernel (paste_kernel.py), run in Triton's interpreter on the CPU (CI has no GPU):
the same change positions as the torch path of mask_rle.paste_transitions, and through rle_strings
the same strings as torchvision's paste_masks_in_image followed by pycocotools, for boxes of every
size, boxes across each edge of the image, empty and full masks, float16 masks, and a batch pasted
in several groups. The fallback to the torch path, where the kernel cannot run, is checked here."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import numpy as np
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from dd.worker.engines.masks import rle_encode
from dd.worker.engines.kernels import paste as paste_kernel
from dd.worker.engines.masks import paste_transitions, rle_strings


def changes(pair):
    inst, pos = pair
    assert inst.dtype == pos.dtype == torch.int64 and inst.shape == pos.shape
    return sorted(zip(inst.tolist(), pos.tolist()))


def check(name, masks, boxes, height, width, threshold=0.5, reference=True):
    n = len(masks)
    kernel = paste_transitions(masks, boxes, height, width, threshold, kernel=True)
    torch_path = paste_transitions(masks, boxes, height, width, threshold, kernel=False)
    assert changes(kernel) == changes(torch_path), name
    strings = rle_strings(*kernel, n, height, width)
    if reference:  # torchvision pastes float32 masks (the engine's torch path casts too)
        pasted = paste_masks_in_image(masks.float()[:, None], boxes, (height, width), padding=1)[:, 0]
        assert strings == rle_encode((pasted >= threshold).numpy()), name
    return kernel


def smooth(n, g, size=28):
    return torch.nn.functional.avg_pool2d(torch.rand(n, 1, size, size, generator=g), 5, 1, 2)[:, 0] * 1.4 - 0.2


g = torch.Generator().manual_seed(0)

# Boxes of every size, from under a pixel to larger than the image, anywhere, some across the edges.
height, width, n = 97, 131, 40
masks = smooth(n, g)
x0 = torch.rand(n, generator=g) * (width + 40) - 30
y0 = torch.rand(n, generator=g) * (height + 30) - 20
size = 2 ** (torch.rand(n, generator=g) * 8.5) - 0.9
boxes = torch.stack([x0, y0, x0 + size, y0 + size * (0.3 + torch.rand(n, generator=g))], 1)
boxes[:, 0::2] = boxes[:, 0::2].clamp(-25, width + 20)  # torchvision's paste fails on a box wholly outside
boxes[:, 1::2] = boxes[:, 1::2].clamp(-25, height + 20)
boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 0.2)
boxes[:, 2] = torch.maximum(boxes[:, 2], torch.tensor(1.0))
boxes[:, 3] = torch.maximum(boxes[:, 3], torch.tensor(1.0))
boxes[:, 0] = torch.minimum(boxes[:, 0], torch.tensor(width - 1.0))
boxes[:, 1] = torch.minimum(boxes[:, 1], torch.tensor(height - 1.0))
boxes[0] = torch.tensor([0.0, 0.0, width, height])  # as large as the image
boxes[1] = torch.tensor([40.0, 30.0, 40.3, 30.4])  # one pixel
boxes[2] = torch.tensor([-15.0, -10.0, 30.0, 20.0])  # across the top-left corner
boxes[3] = torch.tensor([width - 20.0, height - 15.0, width + 25.0, height + 30.0])  # the bottom-right
boxes[4] = torch.tensor([-30.0, 10.0, width + 30.0, 50.0])  # wider than the image
boxes[5] = torch.tensor([50.0, -40.0, 70.0, height + 40.0])  # taller
masks[6] = 0.0  # empty
masks[7] = 1.0  # full: runs that reach the box's last row and wrap into the next column
masks[0] = 1.0  # full on an image-sized box: runs reaching the image's last row
masks[8] = torch.rand(28, 28, generator=g)  # not smooth: many changes
kernel = check("all sizes", masks, boxes, height, width)
assert (kernel[0] == 6).sum() == 0 and (kernel[0] == 7).sum() > 0
check("float16", masks.half(), boxes, height, width)
check("14 x 14 masks, threshold 0.3", smooth(n, g, 14), boxes, height, width, threshold=0.3)

# Many instances on another image, like tests/integration/test_fast_engine.py's chunked one; pasted in groups too.
height, width, n = 150, 210, 60
masks = torch.rand(n, 28, 28, generator=g)
masks[::7] = smooth(len(masks[::7]), g)
x0, y0 = torch.rand(n, generator=g) * width, torch.rand(n, generator=g) * height
size = 2 ** (torch.rand(n, generator=g) * 8)
boxes = torch.stack([x0, y0, (x0 + size).clamp(max=width), (y0 + 0.7 * size).clamp(max=height)], 1)
boxes[0] = torch.tensor([0.0, 0.0, width, height])
masks[0] = 2.0
whole = check("many", masks, boxes, height, width)
paste_kernel.MAX_SLOTS = 6000  # several groups, one launch each (the first instance alone is larger)
some = changes(check("groups", masks[:24], boxes[:24], height, width, reference=False))
assert some == [c for c in changes(whole) if c[0] < 24]
paste_kernel.MAX_SLOTS = 1 << 30

# Boxes wholly outside the image (torchvision's paste cannot take those): nothing, on both paths.
boxes = torch.tensor([[width + 5.0, 10.0, width + 40.0, 50.0], [-50.0, -40.0, -5.0, -3.0],
                      [10.0, height + 3.0, 30.0, height + 9.0], [-20.0, 20.0, -5.0, 40.0]])
kernel = check("outside", torch.ones(4, 28, 28), boxes, height, width, reference=False)
assert kernel[0].numel() == 0

# Nothing on at all, and no instances.
check("empty", torch.zeros(3, 28, 28), torch.tensor([[0.0, 0.0, 50.0, 40.0]] * 3), height, width)
inst, pos = paste_transitions(torch.zeros(0, 28, 28), np.zeros((0, 4), np.float32), height, width, kernel=True)
assert inst.numel() == pos.numel() == 0
print("ok")
"""


def test_triton_paste_kernel_matches_torch_path_and_torchvision() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_paste_falls_back_to_torch_once_when_the_kernel_cannot_run(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from dd.worker.engines import masks as mask_rle
    from dd.worker.engines.kernels import paste as paste_kernel

    calls = []

    def broken(*args: object, **kwargs: object) -> None:
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(paste_kernel, "transitions", broken)
    monkeypatch.setattr(mask_rle._PASTE, "failed", False)
    monkeypatch.setattr(mask_rle._PASTE, "by_default", lambda dev: not mask_rle._PASTE.failed)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(5, 28, 28, generator=g)
    boxes = np.array([[3, 4, 60, 50], [0, 0, 80, 70], [10, 20, 11, 21], [30, 5, 79, 69], [-5, -5, 20, 20]],
                     np.float32)
    want = mask_rle.paste_transitions(masks, boxes, 70, 80, kernel=False)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            got = mask_rle.paste_transitions(masks, boxes, 70, 80)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(calls) == 1  # tried once, then the torch path
    assert sum("paste kernel cannot run" in r.message for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="no compiler"):  # asked for explicitly: no fallback
        mask_rle.paste_transitions(masks, boxes, 70, 80, kernel=True)


def test_paste_uses_the_torch_path_on_the_cpu() -> None:
    from dd.worker.engines import masks as mask_rle

    assert not mask_rle._PASTE.by_default(torch.device("cpu"))
