"""ResNet blocks with their ReLUs and residual adds fused into the convolutions (cuDNN).

With batch norm folded (batchnorm_fold.py), a ResNet-50 FPN still runs a ReLU
after almost every convolution and a residual add before the last ReLU of each
block: about 65 memory-bound passes over the largest activations of the
network, which the profile of the one-graph engine put first among its GPU
time (about 1 ms per 800x1344 image). cuDNN fuses bias, add and ReLU into the
convolution's epilogue; PyTorch exposes that as torch.cudnn_convolution_relu
and torch.cudnn_convolution_add_relu (what torch.jit.freeze's conv-add-relu
fusion emits). Same function up to float rounding: the sum is formed in the
convolution's float32 accumulator instead of after rounding to float16.
"""

from __future__ import annotations

import logging
import types
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from dd.worker.engines.kernels import channels_last as cl_kernels

log = logging.getLogger(__name__)


def _plain(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.bias is not None)


def _conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.cudnn_convolution_relu(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                        conv.groups)


def _fused_bottleneck(self: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    merged = getattr(self, "_merged_bias", None)
    if merged is not None:  # the downsample's bias rides in conv3's epilogue (see _merge_downsample_bias)
        d = self.downsample[0]
        identity = F.conv2d(x, d.weight, None, d.stride, d.padding, d.dilation, d.groups)
    else:
        identity = x if self.downsample is None else self.downsample(x)
        merged = self.conv3.bias
    out = _conv_relu(self.conv1, x)
    out = _conv_relu(self.conv2, out)
    c = self.conv3
    return torch.cudnn_convolution_add_relu(out, c.weight, identity, 1.0, merged, c.stride, c.padding, c.dilation,
                                            c.groups)


def _merge_downsample_bias(block: Bottleneck) -> bool:
    """relu(conv3(y) + b3 + (ds(x) + b_ds)) = relu(conv3(y) + ds(x) + (b3 + b_ds)): the downsample's
    bias (its folded batch norm) added in conv3's epilogue instead of in a pass of its own over the
    block's output (PyTorch adds a cuDNN convolution's bias separately)."""
    ds = block.downsample
    if not (isinstance(ds, nn.Sequential) and len(ds) >= 1 and _plain(ds[0])
            and all(isinstance(m, nn.Identity) for m in ds[1:])):
        return False
    block._merged_bias = (block.conv3.bias + ds[0].bias).detach()  # type: ignore[operator]
    return True


def _fusable(block: Bottleneck) -> bool:
    """Only a block whose norms were folded away (bn* are Identity) and whose ReLU is plain."""
    return (all(isinstance(getattr(block, f"bn{i}"), nn.Identity) for i in (1, 2, 3))
            and all(_plain(getattr(block, f"conv{i}")) for i in (1, 2, 3))
            and isinstance(block.relu, nn.ReLU))


class ConvReLU(nn.Module):
    """A ResNet stem's conv1 with the ReLU after it (whose own module becomes an Identity)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_relu(self.conv, x)


def _stems(model: nn.Module) -> list[nn.Module]:
    """Modules that run conv1, bn1 (folded), relu as consecutive children: ResNet's stem, in the
    ResNet itself or in the IntermediateLayerGetter an FPN backbone wraps it in."""
    out = []
    for m in model.modules():
        names = [n for n, _ in m.named_children()]
        if names[:4] == ["conv1", "bn1", "relu", "maxpool"] and _plain(m.conv1) and isinstance(m.bn1, nn.Identity) \
                and isinstance(m.relu, nn.ReLU):
            out.append(m)
    return out


def fuse_resnet_blocks(model: nn.Module) -> Callable[[], None]:
    """Gives every fusable Bottleneck of model the fused forward, and fuses the stem's ReLU into its
    convolution; returns a function that undoes both (for a device where cuDNN refuses the fused
    operations: the caller tries one forward first)."""
    fused = [m for m in model.modules() if isinstance(m, Bottleneck) and _fusable(m)]
    for block in fused:
        block.forward = types.MethodType(_fused_bottleneck, block)  # type: ignore[method-assign]
        _merge_downsample_bias(block)
    stems = [(m, m.conv1, m.relu) for m in _stems(model)]
    for stem, conv, _ in stems:
        stem.conv1, stem.relu = ConvReLU(conv), nn.Identity()
    log.debug("fused the ReLUs and residual adds of %d ResNet blocks and %d stems into their convolutions",
              len(fused), len(stems))

    def undo() -> None:
        for block in fused:
            del block.forward  # back to the class's forward
            block.__dict__.pop("_merged_bias", None)
        for stem, conv, relu in stems:
            stem.conv1, stem.relu = conv, relu
    return undo


def fuse_conv_relu_pairs(model: nn.Module) -> Callable[[], None]:
    """Every Conv2d followed by a ReLU in a Sequential (torchvision's Conv2dNormActivation without a
    norm: the RPN head's conv, the mask head's layers) becomes one ConvReLU: bias and ReLU in the
    convolution's epilogue instead of two passes over its output. Returns the undo."""
    done: list[tuple[nn.Sequential, str, nn.Module, str, nn.Module]] = []
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = [n for n, _ in seq.named_children()]
        for a, b in zip(names, names[1:]):
            conv, relu = getattr(seq, a), getattr(seq, b)
            if _plain(conv) and isinstance(relu, nn.ReLU):
                done.append((seq, a, conv, b, relu))
                setattr(seq, a, ConvReLU(conv))
                setattr(seq, b, nn.Identity())

    def undo() -> None:
        for seq, a, conv, b, relu in done:
            setattr(seq, a, conv)
            setattr(seq, b, relu)
    return undo


def _only_conv(block: nn.Module) -> nn.Conv2d | None:
    """The Conv2d an FPN block is (torchvision's Conv2dNormActivation with no norm and no activation
    is a Sequential of just that), else None."""
    parts = list(block.children()) if isinstance(block, nn.Sequential) else [block]
    return parts[0] if len(parts) == 1 and _plain(parts[0]) else None


def _conv_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return cl_kernels.bias_add_(y, conv.bias)


def _fused_fpn_forward(self: FeaturePyramidNetwork, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's FeaturePyramidNetwork.forward with each level's bias add, nearest upsampling of
    the level above and the sum as one pass (cl_kernels.upsample_add, into the lateral's own
    output), and the output convolutions' biases added by cl_kernels.bias_add_."""
    names, feats = list(x.keys()), list(x.values())
    inner = [_only_conv(b) for b in self.inner_blocks]
    layer = [_only_conv(b) for b in self.layer_blocks]
    last = _conv_bias(inner[-1], feats[-1])
    results = [_conv_bias(layer[-1], last)]
    for idx in range(len(feats) - 2, -1, -1):
        conv = inner[idx]
        lateral = F.conv2d(feats[idx], conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        last = cl_kernels.upsample_add(lateral, last, conv.bias, out=lateral)
        results.insert(0, _conv_bias(layer[idx], last))
    if self.extra_blocks is not None:
        results, names = self.extra_blocks(results, feats, names)
    return OrderedDict(zip(names, results))


class StemMaxPool(nn.Module):
    """A ResNet stem's MaxPool2d(3, 2, 1) without the int64 indices CUDA's max_pool2d always writes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cl_kernels.max_pool_3x3_s2(x)


def _is_stem_pool(m: nn.Module) -> bool:
    def pair(v: object) -> tuple:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (isinstance(m, nn.MaxPool2d) and pair(m.kernel_size) == (3, 3) and pair(m.stride) == (2, 2)
            and pair(m.padding) == (1, 1) and pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


def fuse_fpn(model: nn.Module) -> Callable[[], None]:
    """The FPN's top-down merges and biases, and the ResNet stem's max pool, as the one-pass
    channels-last kernels of cl_kernels (on the CPU, and for other layouts, they run their torch
    definitions). Only FPNs whose blocks are plain convolutions. Returns the undo."""
    fpns = [m for m in model.modules() if isinstance(m, FeaturePyramidNetwork)
            and all(_only_conv(b) is not None for b in list(m.inner_blocks) + list(m.layer_blocks))]
    for fpn in fpns:
        fpn.forward = types.MethodType(_fused_fpn_forward, fpn)  # type: ignore[method-assign]
    pools = [(m, m.maxpool) for m in model.modules()
             if "maxpool" in dict(m.named_children()) and _is_stem_pool(m.maxpool)]
    for parent, _ in pools:
        parent.maxpool = StemMaxPool()

    def undo() -> None:
        for fpn in fpns:
            del fpn.forward
        for parent, pool in pools:
            parent.maxpool = pool
    return undo
