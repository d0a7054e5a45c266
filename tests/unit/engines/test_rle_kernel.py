"""The Triton RLE kernels (rle_kernel.py), run in Triton's interpreter on the CPU (CI has no GPU): the
same strings as pycocotools' mask.encode of the full masks and as the torch path of
mask_rle.rle_strings, for empty and full masks, masks that start on the first pixel or end on the
last, runs that wrap from the bottom of one column to the top of the next (given twice, as the paste
gives them), long runs (values of one to seven 5-bit groups: up to 600 M pixels on a 20,000 x 30,000
image, there against pycocotools' strings of the counts), counts smaller than the one two before
(negative deltas), keys past 2**32, one instance, none, many without a change, small programs (each kernel's blocks and
binary searches across program edges), sorted and unsorted input, and masks pasted into boxes by
either paste path, end to end through paste_and_encode. The fallback to the torch path, where the
kernels cannot run, is checked here. On a GPU (gpu marker) the same cases run compiled."""

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
import os

import numpy as np
import torch
from pycocotools import mask as mask_util
from torchvision.models.detection.roi_heads import paste_masks_in_image

from dd.worker.engines.masks import rle_encode
from dd.worker.engines import masks as mask_rle
from dd.worker.engines.kernels import rle as rle_kernel
from dd.worker.engines.masks import _rle_strings_torch, paste_transitions, rle_strings

DEV = torch.device(os.environ.get("DD_TEST_DEVICE", "cpu"))  # cpu: the kernels in Triton's interpreter


def coco(masks):
    return [r["counts"] for r in mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))]


def counts(mask):  # COCO's run lengths of one H x W mask
    flat = np.concatenate([[0], mask.T.reshape(-1), [0]]).astype(np.int8)
    at = np.flatnonzero(np.diff(flat))
    return np.diff(np.concatenate([[0], at[at < flat.size - 2], [flat.size - 2]]))


def flat_changes(masks):
    # Changes along the whole column-major order: a run crossing columns gives no mark there, a mask
    # on at the last pixel gives height * width.
    flat = masks.transpose(0, 2, 1).reshape(len(masks), -1)
    return np.nonzero(np.diff(np.pad(flat, ((0, 0), (1, 1))).astype(np.int8), axis=1))


def column_changes(masks):
    # As the paste gives them: each column framed by off rows above and below, so a run from the
    # bottom of a column into the top of the next gives the position (x + 1) * height twice.
    n, height, width = masks.shape
    cols = np.pad(masks.transpose(0, 2, 1), ((0, 0), (0, 0), (1, 1))).astype(np.int8)
    i, x, r = np.nonzero(np.diff(cols, axis=2))
    return i, x * height + r


def check(name, masks, blocks=(None, 64)):
    n, height, width = masks.shape
    want = coco(masks)
    rng = np.random.default_rng(len(name))
    for style in (flat_changes, column_changes):
        inst, pos = (torch.from_numpy(np.ascontiguousarray(a)).long().to(DEV) for a in style(masks))
        order = torch.from_numpy(rng.permutation(len(inst))).to(DEV)
        assert _rle_strings_torch(inst, pos, n, height, width, presorted=True) == want, (name, style)
        assert _rle_strings_torch(inst[order], pos[order], n, height, width) == want, (name, style)
        assert rle_strings(inst, pos, n, height, width, presorted=True, kernel=True) == want, (name, style)
        assert rle_strings(inst[order], pos[order], n, height, width, kernel=True) == want, (name, style)
        for block in blocks:
            got = rle_kernel.strings(inst, pos, n, height, width, presorted=True, block=block)
            assert got == want, (name, style, block)
    return want


rng = np.random.default_rng(0)

# Edge cases on a 60 x 90 image.
height, width = 60, 90
masks = np.zeros((16, height, width), np.uint8)
masks[1] = 1  # full
masks[2, :10, 0] = 1  # from the first pixel
masks[3, 50:, -1] = 1  # to the last
masks[4, :, :] = 1
masks[4, 20:30, 40:50] = 0  # both, with a hole
masks[5, 0, 0] = 1  # the first pixel alone
masks[6, -1, -1] = 1  # the last pixel alone
masks[7, 50:, 10] = 1
masks[7, :5, 11] = 1  # a run from the bottom of column 10 into the top of column 11
masks[8, :, 20:35] = 1  # whole columns: every column boundary of the run given twice
masks[9, 30:, 3] = 1
masks[9, :, 4:7] = 1
masks[9, :12, 7] = 1  # wrapping through several whole columns
masks[10] = rng.random((height, width)) > 0.5  # noise: short runs, negative deltas
masks[11, :, 0] = 1  # the first column only
masks[12, :, -1] = 1  # the last column only
for k in (13, 14, 15):
    for _ in range(12):  # rectangles: long runs and counts smaller than the one two before
        y, x = rng.integers(0, height), rng.integers(0, width)
        masks[k, y:y + rng.integers(1, 40), x:x + rng.integers(1, 60)] ^= 1
assert any((c[3:] < c[1:-2]).any() for c in map(counts, masks))  # negative deltas
check("edges", masks, blocks=(None, 128))
for k in (0, 1, 4, 9):  # one instance
    check(f"single {k}", masks[k:k + 1], blocks=(None, 16))
check("many empty", np.zeros((50, height, width), np.uint8), blocks=(None, 16))
sparse = np.zeros((48, height, width), np.uint8)
sparse[::7, 5, 5] = 1  # more instances than changes (bounds past the last run), a multiple of 16
check("sparse", sparse, blocks=(None, 16))

# No instances.
empty = torch.zeros(0, dtype=torch.int64, device=DEV)
assert rle_strings(empty, empty, 0, height, width, kernel=True) == []
assert rle_kernel.strings(empty, empty, 0, height, width) == []

# Long runs: counts of up to 31,500 (four 5-bit groups) on 150 x 210, rectangles of every size.
height, width = 150, 210
masks = np.zeros((6, height, width), np.uint8)
masks[0, -3:, -2:] = 1
masks[1, 5:8, 3] = 1
for k in range(2, 6):
    for _ in range(15):
        y, x = rng.integers(0, height), rng.integers(0, width)
        masks[k, y:y + rng.integers(1, 150), x:x + rng.integers(1, 200)] ^= 1
assert max(c.max() for c in map(counts, masks)) >= 1 << 14
check("long", masks, blocks=(None, 512))

# A large image with sparse rectangles: counts of millions (five groups), positions past 2**31 as keys.
height, width = 1500, 2500
masks = np.zeros((4, height, width), np.uint8)
masks[0, 900:, 2000:] = 1  # to the last pixel
masks[1, :700, :3] = 1  # from the first
for k in (2, 3):
    for _ in range(8):
        y, x = rng.integers(0, height), rng.integers(0, width)
        masks[k, y:y + rng.integers(1, 400), x:x + rng.integers(1, 300)] ^= 1
want = coco(masks)
for style in (flat_changes, column_changes):
    inst, pos = (torch.from_numpy(np.ascontiguousarray(a)).long().to(DEV) for a in style(masks))
    assert rle_strings(inst, pos, 4, height, width, presorted=True, kernel=True) == want, style
    inst = inst + 1000  # instances 1000 to 1003 of 1004: keys past 2**32
    order = torch.from_numpy(rng.permutation(len(inst))).to(DEV)
    got = rle_strings(inst[order], pos[order], 1004, height, width, kernel=True)
    assert got[1000:] == want and got[:1000] == [coco(np.zeros((1, height, width), np.uint8))[0]] * 1000

# Runs of every magnitude up to 600 M pixels (one to seven characters) on a 20,000 x 30,000 image, from
# changes alone (pycocotools writes the strings of the counts: frPyObjects of uncompressed RLE). Each
# instance's changes at gaps of 1 to 2**29 pixels, some given twice (those cancel), and height * width.
height, width = 20000, 30000
total = height * width
inst, pos, want, sizes, negative = [], [], [], set(), False
for i in range(12):
    gaps = np.round(2 ** rng.uniform(0, 29 if i % 3 else 24, 1 + i * 3)).astype(np.int64)
    at = np.unique(np.concatenate([[0] if i == 4 else [], np.cumsum(gaps)]))
    at = at[at < total].astype(np.int64)
    twice = at[rng.random(len(at)) < 0.2]
    ends = [total] if i % 2 else []
    kept = np.setdiff1d(at, twice)
    inst += [i] * (len(at) + len(twice) + len(ends))
    pos += list(at) + list(twice) + ends
    runs = np.diff(np.concatenate([[0], kept, [total]]))
    want.append(mask_util.frPyObjects({"counts": runs.tolist(), "size": [height, width]}, height, width)["counts"])
    x = runs - np.concatenate([[0, 0, 0], runs[1:-2]])[:len(runs)]  # rleToString's values
    y = np.where(x < 0, -x - 1, x)
    sizes |= {int(b).bit_length() // 5 + 1 for b in y}  # their numbers of characters
    negative |= bool((x < 0).any())
assert sizes == set(range(1, 8)) and negative
inst, pos = torch.tensor(inst, device=DEV), torch.tensor(pos, device=DEV)
assert rle_strings(inst, pos, 12, height, width, kernel=True) == want
assert _rle_strings_torch(inst, pos, 12, height, width) == want
order = torch.from_numpy(np.lexsort((pos.cpu().numpy(), inst.cpu().numpy()))).to(DEV)
assert rle_strings(inst[order], pos[order], 12, height, width, presorted=True, kernel=True) == want
assert rle_kernel.strings(inst[order], pos[order], 12, height, width, presorted=True, block=16) == want


# Masks pasted into boxes: by the paste kernel (sorted output) and the torch path (unsorted).
def smooth(n, g, size=28):
    return torch.nn.functional.avg_pool2d(torch.rand(n, 1, size, size, generator=g), 5, 1, 2)[:, 0] * 1.4 - 0.2


g = torch.Generator().manual_seed(0)
height, width, n = 97, 131, 30
masks = smooth(n, g)
x0, y0 = torch.rand(n, generator=g) * (width - 2), torch.rand(n, generator=g) * (height - 2)
x1 = torch.minimum(x0 + torch.rand(n, generator=g) * 150 + 0.5, torch.tensor(float(width)))
y1 = torch.minimum(y0 + torch.rand(n, generator=g) * 150 + 0.5, torch.tensor(float(height)))
boxes = torch.stack([x0, y0, x1, y1], 1)
boxes[0] = torch.tensor([0.0, 0.0, width, height])  # as large as the image
masks[0] = 2.0  # full: runs that reach the image's last row and wrap, to the last pixel
masks[1] = -1.0  # empty
want = rle_encode((paste_masks_in_image(masks[:, None], boxes, (height, width), padding=1)[:, 0] >= 0.5).numpy())
masks, boxes = masks.to(DEV), boxes.to(DEV)
inst, pos = paste_transitions(masks, boxes, height, width, kernel=True)
key = inst * (height * width + 1) + pos
assert bool((key[1:] >= key[:-1]).all())  # the paste kernel's order: what presorted=True relies on
assert rle_strings(inst, pos, n, height, width, presorted=True, kernel=True) == want
assert _rle_strings_torch(inst, pos, n, height, width, presorted=True) == want
inst, pos = paste_transitions(masks, boxes, height, width, kernel=False)
assert rle_strings(inst, pos, n, height, width, kernel=True) == want
assert _rle_strings_torch(inst, pos, n, height, width) == want

# End to end, as on a GPU: both kernels by default (here in the interpreter), the RLE told the
# changes come sorted.
seen = []
strings = mask_rle.rle_strings
mask_rle.rle_strings = lambda *a, **k: seen.append(a[5]) or strings(*a, **k)
mask_rle._PASTE.by_default = lambda dev: not mask_rle._PASTE.failed
mask_rle._RLE.by_default = lambda dev: not mask_rle._RLE.failed
assert mask_rle.paste_and_encode(masks, boxes, height, width) == want
assert seen == [True] and not mask_rle._PASTE.failed and not mask_rle._RLE.failed
print("ok")
"""


def _run_script(**env: str) -> None:
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), **env)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_triton_rle_kernels_match_pycocotools_and_torch_path() -> None:
    _run_script(TRITON_INTERPRET="1")


@pytest.mark.gpu
def test_rle_kernels_compiled_for_the_gpu_match_pycocotools() -> None:
    """The same cases compiled for the GPU: the interpreter does not run the code the GPU runs (a refactor
    of the write step passed it and wrote other strings than pycocotools' on an H200: BENCHMARKS.md,
    session 21)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _run_script(DD_TEST_DEVICE="cuda:0")


def _changes() -> tuple[torch.Tensor, torch.Tensor, list[bytes], int, int]:
    from dd.worker.engines.masks import rle_encode

    rng = np.random.default_rng(3)
    masks = rng.random((4, 30, 40)) > 0.6
    masks[0] = False
    flat = masks.transpose(0, 2, 1).reshape(4, -1)
    inst, pos = np.nonzero(np.diff(np.pad(flat, ((0, 0), (1, 1))).astype(np.int8), axis=1))
    return torch.from_numpy(inst), torch.from_numpy(pos), rle_encode(masks), 30, 40


def test_rle_falls_back_to_torch_once_when_the_kernels_cannot_run(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from dd.worker.engines import masks as mask_rle
    from dd.worker.engines.kernels import rle as rle_kernel

    calls = []

    def broken(*args: object, **kwargs: object) -> None:
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(rle_kernel, "strings", broken)
    monkeypatch.setattr(mask_rle._RLE, "failed", False)
    monkeypatch.setattr(mask_rle._RLE, "by_default", lambda dev: not mask_rle._RLE.failed)
    inst, pos, want, height, width = _changes()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert mask_rle.rle_strings(inst, pos, 4, height, width) == want
    assert len(calls) == 1  # tried once, then the torch path
    assert sum("RLE kernels cannot run" in r.message for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="no compiler"):  # asked for explicitly: no fallback
        mask_rle.rle_strings(inst, pos, 4, height, width, kernel=True)


def test_rle_uses_the_torch_path_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from dd.worker.engines import masks as mask_rle
    from dd.worker.engines.kernels import rle as rle_kernel

    assert not mask_rle._RLE.by_default(torch.device("cpu"))

    def unexpected(*args: object, **kwargs: object) -> None:
        raise AssertionError("the kernels ran on the CPU")

    monkeypatch.setattr(rle_kernel, "strings", unexpected)
    inst, pos, want, height, width = _changes()
    assert mask_rle.rle_strings(inst, pos, 4, height, width) == want


def test_paste_and_encode_sorts_what_the_torch_paste_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """presorted is asked after the paste: a paste kernel that failed in it gave unsorted changes."""
    from dd.worker.engines import masks as mask_rle
    from dd.worker.engines.kernels import paste as paste_kernel

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler here")

    seen = []
    strings = mask_rle.rle_strings
    monkeypatch.setattr(mask_rle, "rle_strings", lambda *a, **k: seen.append(a[5]) or strings(*a, **k))
    monkeypatch.setattr(paste_kernel, "transitions", broken)
    monkeypatch.setattr(mask_rle._PASTE, "failed", False)
    monkeypatch.setattr(mask_rle._PASTE, "by_default", lambda dev: not mask_rle._PASTE.failed)
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(3, 28, 28, generator=g)
    boxes = np.array([[3, 4, 60, 50], [0, 0, 80, 70], [30, 5, 79, 69]], np.float32)
    want = mask_rle._rle_strings_torch(*mask_rle.paste_transitions(masks, boxes, 70, 80, kernel=False), 3, 70, 80)
    assert mask_rle.paste_and_encode(masks, boxes, 70, 80) == want
    assert seen == [False]
