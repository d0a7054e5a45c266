"""Mask R-CNN built from torchvision parts, for RGB (3 channels) and RGB-D (4 channels).

With the default architecture the module names, and so the state-dict keys,
are those of torchvision's maskrcnn_resnet50_fpn: a checkpoint trained with
torchvision loads as it is. Smaller variants (a narrower FPN and heads, a
MobileNetV3 backbone) serve the demo models and the tests on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from dd.models.semantics import TORCHVISION

_RESNET_WIDTH = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def _widen_first_conv(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """The stem conv for `channels` inputs; extra input channels start at the mean of the RGB filters."""
    if channels == conv.in_channels:
        return conv
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight[:, : conv.in_channels] = conv.weight
        new.weight[:, conv.in_channels:] = conv.weight.mean(dim=1, keepdim=True)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _resnet_fpn(name: str, channels: int, fpn_channels: int) -> BackboneWithFPN:
    body = getattr(resnet, name)(weights=None, norm_layer=FrozenBatchNorm2d)
    body.conv1 = _widen_first_conv(body.conv1, channels)
    width = _RESNET_WIDTH[name]
    return BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[width // 8, width // 4, width // 2, width],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _mobilenet_fpn(channels: int, fpn_channels: int) -> BackboneWithFPN:
    features = mobilenet_v3_large(weights=None).features
    first = features[0][0]
    features[0][0] = _widen_first_conv(first, channels)
    stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    # The outputs of the last three stage-starting blocks: output strides 16, 32 and 32 (a
    # stage's first block downsamples). Coarse, but cheap on a CPU; cartons are large.
    returned = stage_indices[-3:]
    return_layers = {str(idx): str(k) for k, idx in enumerate(returned)}
    in_channels = [features[idx].out_channels for idx in returned]
    return BackboneWithFPN(features, return_layers, in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())


def build_maskrcnn(
    architecture: dict[str, Any],
    num_classes: int,
    channels: int,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    score_threshold: float = 0.05,
) -> MaskRCNN:
    """A randomly initialised Mask R-CNN of the given shape; load a state dict into it."""
    backbone_name = architecture["backbone"]
    fpn = int(architecture["fpn_channels"])
    if backbone_name == "mobilenet_v3_large":
        backbone = _mobilenet_fpn(channels, fpn)
        levels = 4  # three stages + the max-pool level
    else:
        backbone = _resnet_fpn(backbone_name, channels, fpn)
        levels = 5
    if levels == 5:
        sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    else:  # coarser pyramid: two sizes a level so small boxes still get anchors
        sizes = ((32, 64), (64, 128), (128, 256), (256, 512))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    feature_names = [str(i) for i in range(levels - 1)]
    box_dim = int(architecture["box_head_dim"])
    mask_ch = int(architecture["mask_head_channels"])
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(feature_names, 7, 2),
        box_head=TwoMLPHead(fpn * 7 * 7, box_dim),
        box_predictor=FastRCNNPredictor(box_dim, num_classes),
        box_score_thresh=score_threshold,
        box_detections_per_img=int(architecture["max_detections"]),
        mask_roi_pool=MultiScaleRoIAlign(feature_names, 14, 2),
        mask_head=MaskRCNNHeads(fpn, [mask_ch] * int(architecture["mask_head_layers"]), 1),
        mask_predictor=MaskRCNNPredictor(mask_ch, mask_ch, num_classes),
    )
    if levels == 4:
        # The RPN head must predict as many anchors per location as the first level has.
        from torchvision.models.detection.rpn import RPNHead

        model.rpn.head = RPNHead(fpn, anchors.num_anchors_per_location()[0])
    model.semantics = TORCHVISION  # engines that reimplement a step read its rule from here
    return model


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads a checkpoint safely (weights only: nothing in it is executed).

    Accepts a bare state dict or the usual wrappers ({"model": ...}, {"state_dict": ...}),
    strips DataParallel's "module." prefix, and upcasts half-precision weights
    (the demo models are stored in fp16 to stay small).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors alike: say which file and why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{path}: not a PyTorch checkpoint that torch.load(weights_only=True) can read "
                         f"({type(exc).__name__}: {first[:200]}); MODEL_WEIGHT must be a state dict saved with "
                         "torch.save") from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (a mapping of tensor names to tensors)")
    out = {}
    for k, v in obj.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k.endswith("num_batches_tracked"):
            continue  # BatchNorm bookkeeping; our backbones use frozen batch norm
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.float()
        out[k] = v
    return out
