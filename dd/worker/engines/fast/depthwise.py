"""Depthwise convolutions on PyTorch's own CUDA kernel instead of cuDNN.

MobileNetV3 (the demo models' backbone) has a depthwise convolution (groups = channels) in
every block. In half precision, or channels-last, PyTorch hands those to cuDNN, and cuDNN 9
builds a kernel for each new shape at its first call: measured on an H200 (run S9-1, the probe that
is now `scripts/bench_conv_first_call.py`), 157-490 ms per depthwise shape against 0.1 ms for the second call,
while PyTorch's native depthwise kernel (what it uses for fp32 NCHW) costs 0-3 ms the first
time. Every batch bucket and canvas has new shapes, so each graph capture of the demo model
took 1.8-2.7 s (0.2-0.3 s for an R50), and its warm start 18.5 s.

Here each such convolution calls the native kernel (`aten::_conv_depthwise2d`) directly, in
its own NCHW layout, and hands the next layer its input's memory format back. On the CPU the
module is the plain convolution (the native kernel is CUDA-only).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_depthwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    y = torch.ops.aten._conv_depthwise2d(x.contiguous(), self.weight.contiguous(), self.kernel_size, self.bias,
                                         self.stride, self.padding, self.dilation)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def native_depthwise(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """Every depthwise convolution of `model` on the native kernel; returns how many, and an undo."""
    convs = [m for m in model.modules() if is_depthwise(m)]
    for conv in convs:
        conv.forward = _forward.__get__(conv)  # type: ignore[method-assign]

    def undo() -> None:
        for conv in convs:
            del conv.forward
    return len(convs), undo
