"""ClassMaskHead against torchvision's mask head, predictor and maskrcnn_inference, on the CPU."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference

from dd.worker.engines.fast.mask_head import ClassMaskHead


def _heads(channels: int = 16, reduced: int = 12, classes: int = 5, layers: int = 4):
    torch.manual_seed(0)
    head = MaskRCNNHeads(channels, [channels] * layers, 1).eval()
    predictor = MaskRCNNPredictor(channels, reduced, classes).eval()
    for p in list(head.parameters()) + list(predictor.parameters()):
        torch.nn.init.normal_(p, std=0.2)  # non-zero biases: a bias dropped or doubled shows
    return head, predictor


@pytest.mark.parametrize("layers", [4, 2])
def test_class_mask_head_matches_torchvision(layers: int) -> None:
    head, predictor = _heads(layers=layers)
    x = torch.randn(9, 16, 14, 14)
    labels = torch.tensor([0, 4, 1, 1, 3, 2, 4, 0, 2])
    with torch.no_grad():
        expected = maskrcnn_inference(predictor(head(x)), [labels])[0][:, 0]
        got = ClassMaskHead(head, predictor, torch.float32)(x, labels)
        got_cl = ClassMaskHead(head, predictor, torch.float32)(x.contiguous(memory_format=torch.channels_last), labels)
    assert got.shape == (9, 28, 28) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_cl, expected, rtol=0, atol=1e-5)


def test_no_rois() -> None:
    head, predictor = _heads()
    with torch.no_grad():
        assert ClassMaskHead(head, predictor, torch.float32)(torch.zeros(0, 16, 14, 14),
                                                              torch.zeros(0, dtype=torch.int64)).shape == (0, 28, 28)


def test_other_heads_are_refused() -> None:
    head, predictor = _heads()
    normed = MaskRCNNHeads(16, [16, 16], 1, norm_layer=torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="MaskRCNNHeads"):
        ClassMaskHead(normed, predictor, torch.float32)
    predictor.conv5_mask = torch.nn.ConvTranspose2d(16, 12, 4, 2, 1)
    with pytest.raises(ValueError, match="transposed"):
        ClassMaskHead(head, predictor, torch.float32)
