"""The Triton suppression-matrix kernel, run in Triton's interpreter on the CPU (CI has no GPU):
the same matrix as the torch operations, bit for bit, and greedy NMS's answer through nms_fixed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import torch
from torchvision.ops import batched_nms, nms

from dd.worker.engines.kernels import suppression
from dd.worker.engines.fast.fixed_shapes import nms_fixed, suppression_matrix

g = torch.Generator().manual_seed(0)
for groups, k, labelled in [(3, 150, False), (2, 130, True), (1, 1, False), (2, 64, False)]:
    xy = torch.rand(groups, k, 2, generator=g) * 200
    wh = torch.rand(groups, k, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], -1)
    valid = torch.rand(groups, k, generator=g) > 0.1
    labels = torch.randint(0, 4, (groups, k), generator=g) if labelled else None
    boxes[:, 1::7] = boxes[:, 0::7][:, : boxes[:, 1::7].shape[1]] + 0.5  # near-duplicates: IoU near any threshold
    boxes[:, 2::11, 2:] = boxes[:, 2::11, :2]  # empty boxes: 0 / 0 IoU
    # pairs whose IoU is exactly a threshold (10 x 10 and 10 x 3, 5, 7 at one corner): not suppressed
    for n, height in enumerate((3.0, 5.0, 7.0)):
        if k > 8 + 2 * n:
            boxes[:, 4 + 2 * n] = torch.tensor([300.0 + 20 * n, 300.0, 310.0 + 20 * n, 310.0])
            boxes[:, 5 + 2 * n] = torch.tensor([300.0 + 20 * n, 300.0, 310.0 + 20 * n, 300.0 + height])
            valid[:, 4 + 2 * n] = True
            if labels is not None:
                labels[:, 5 + 2 * n] = labels[:, 4 + 2 * n]
    for thr in (0.3, 0.5, 0.7):
        exact = [4 + 2 * n for n in range(3) if k > 8 + 2 * n]
        got = suppression.suppression_matrix(boxes, valid, thr, labels, torch.float32)
        want = suppression_matrix(boxes, valid, thr, labels, torch.float32)
        assert torch.equal(got, want), (groups, k, thr)
        for n, j in enumerate(exact):  # an IoU equal to the threshold does not suppress (torchvision: ">")
            iou = (0.3, 0.5, 0.7)[n]
            assert got[0, j, j + 1] == (1.0 if iou > thr + 1e-6 else 0.0), (j, thr)
    scores = torch.rand(groups, k, generator=g).sort(dim=1, descending=True).values
    keep, settled = nms_fixed(boxes, valid, 0.5, 64, labels, kernel=True)
    assert settled.all()
    for i in range(groups):
        idx = valid[i].nonzero()[:, 0]
        if labels is None:
            ref = idx[nms(boxes[i][idx], scores[i][idx], 0.5)]
        else:
            ref = idx[batched_nms(boxes[i][idx], scores[i][idx], labels[i][idx], 0.5)]
        assert torch.equal(keep[i].nonzero()[:, 0], ref.sort().values)
print("ok")
"""


def test_triton_suppression_matrix_is_the_torch_one() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
