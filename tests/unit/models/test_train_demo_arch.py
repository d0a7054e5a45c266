"""scripts/train_demo.py --arch r50: a ResNet trained with live BatchNorm must load into the served frozen-BN model.

Why: dd.models builds ResNet backbones with FrozenBatchNorm2d (torchvision's fine-tuning choice); from scratch
the training script swaps in trainable BatchNorm2d, and the folder it writes must still load strictly into the
server's model, with the trained statistics in place (not the identity that frozen BN starts as).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from dd.config import DEFAULT_ARCHITECTURE
from dd.models.maskrcnn import build_maskrcnn

_SPEC = importlib.util.spec_from_file_location(
    "train_demo", Path(__file__).resolve().parents[3] / "scripts" / "train_demo.py")
td = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("train_demo", td)
_SPEC.loader.exec_module(td)

ARCH = dict(DEFAULT_ARCHITECTURE, backbone="resnet18", fpn_channels=32, box_head_dim=64, mask_head_channels=16,
            mask_head_layers=1, max_detections=10)


def build() -> nn.Module:
    return build_maskrcnn(ARCH, 2, 4, 64, 96, [0.5] * 4, [0.25] * 4)


def test_r50_is_torchvisions_shape() -> None:
    assert td.ARCHITECTURES["r50"] == DEFAULT_ARCHITECTURE


def test_live_batchnorm_trains_and_its_state_loads_into_the_frozen_model() -> None:
    torch.manual_seed(0)
    model = build()
    frozen_before = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert td.live_batchnorm(model.backbone, zero_init_residual=True) == frozen_before > 0
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0.0 for b in model.backbone.body.layer1)  # zero-init residual
    model.backbone.train()
    with torch.no_grad():
        model.backbone(torch.randn(2, 4, 64, 64) * 3 + 1)  # moves the running statistics
    state = td.served_state(model)
    assert not any(k.endswith("num_batches_tracked") for k in state)
    served = build()
    served.load_state_dict(state, strict=True)  # raises on any missing or extra key
    bn = served.backbone.body.bn1
    assert isinstance(bn, FrozenBatchNorm2d)
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))  # the trained statistics came
