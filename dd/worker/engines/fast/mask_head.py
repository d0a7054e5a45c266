"""Mask R-CNN's mask head for the detections' own classes only, with every bias and ReLU fused.

torchvision's MaskRCNNHeads + MaskRCNNPredictor run four 3x3 convolutions,
a 2x2 stride-2 transposed convolution and a 1x1 convolution to every class's
logits, each convolution's bias and ReLU as passes of their own over the
pooled features (PyTorch adds a cuDNN convolution's bias separately), and
maskrcnn_inference then keeps one class per detection. In the profile of the
one-graph engine (batch 16, 1600 detections) those passes, the layout
transposes around the NCHW convolutions and the float copy of all 91 classes'
logits cost about 4 ms. Here, on float16 channels-last features:

- each 3x3 convolution is cuDNN's convolution + bias + ReLU (one kernel);
- the transposed convolution, whose 2x2 windows do not overlap, is one
  matrix product per pixel: [R*14*14, C] x [C, 4*C'] with its bias and ReLU in
  cuBLAS's epilogue (torch._addmm_activation);
- the logits are computed for each detection's own class only: one batched
  matrix-vector product of its [4*14*14, C'] features with that class's
  weights, and the four sub-pixels are interleaved into the 28 x 28 mask.

Same function up to float rounding (sums formed in float32 accumulators
before rounding to float16, instead of after).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_relu_layers(head: nn.Module) -> list[nn.Conv2d] | None:
    """The convolutions of a MaskRCNNHeads whose blocks are conv + ReLU (no norm), else None."""
    convs = []
    for block in head.children():
        parts = list(block.children()) if isinstance(block, nn.Sequential) else [block]
        if len(parts) != 2 or not isinstance(parts[0], nn.Conv2d) or not isinstance(parts[1], nn.ReLU):
            return None
        conv = parts[0]
        if conv.bias is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.groups != 1:
            return None
        convs.append(conv)
    return convs


class ClassMaskHead(nn.Module):
    """mask_head + mask_predictor + maskrcnn_inference's per-class pick, as probabilities [R, 2M, 2M]."""

    def __init__(self, head: nn.Module, predictor: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        convs = _conv_relu_layers(head)
        deconv = getattr(predictor, "conv5_mask", None)
        logits = getattr(predictor, "mask_fcn_logits", None)
        if convs is None or not isinstance(deconv, nn.ConvTranspose2d) or not isinstance(logits, nn.Conv2d):
            raise ValueError("not a plain torchvision MaskRCNNHeads + MaskRCNNPredictor")
        if (deconv.kernel_size != (2, 2) or deconv.stride != (2, 2) or deconv.padding != (0, 0)
                or deconv.output_padding != (0, 0) or deconv.groups != 1 or deconv.bias is None
                or logits.kernel_size != (1, 1) or logits.bias is None):
            raise ValueError("the mask predictor is not a 2x2 stride-2 transposed convolution and a 1x1 one")
        self.dtype = dtype
        self.convs = [(conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last),
                       conv.bias.detach().to(dtype), conv.padding, conv.dilation) for conv in convs]
        c_in, c_out = deconv.weight.shape[:2]
        # [C, C', a, b] -> [C, (a, b, C')]: output pixel (2i + a, 2j + b) from input pixel (i, j).
        self.up_weight = deconv.weight.detach().permute(0, 2, 3, 1).reshape(c_in, 4 * c_out).to(dtype)
        self.up_bias = deconv.bias.detach().repeat(4).to(dtype)
        self.class_weight = logits.weight.detach()[:, :, 0, 0].to(dtype)  # [K, C']
        self.class_bias = logits.bias.detach().float()
        self.c_out = c_out

    def forward(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """pooled [R, C, M, M] (any layout; channels-last float16 is what it is fast on), labels [R]
        -> float32 probabilities [R, 2M, 2M] of each RoI's own class."""
        x = pooled.to(self.dtype).contiguous(memory_format=torch.channels_last)
        r, _, m, _ = x.shape
        for weight, bias, padding, dilation in self.convs:
            if x.is_cuda:
                x = torch.cudnn_convolution_relu(x, weight, bias, (1, 1), padding, dilation, 1)
            else:
                x = F.relu(F.conv2d(x, weight, bias, 1, padding, dilation))
            x = x.contiguous(memory_format=torch.channels_last)
        rows = x.permute(0, 2, 3, 1).reshape(r * m * m, x.shape[1])  # channels-last: a view, pixel by pixel
        up = torch._addmm_activation(self.up_bias, rows, self.up_weight)  # relu(rows @ W + b): [R*M*M, 4*C']
        up = up.view(r, m * m * 4, self.c_out)
        logit = torch.bmm(up, self.class_weight[labels][:, :, None])[..., 0].float() + self.class_bias[labels][:, None]
        # [R, (i, j, a, b)] -> [R, 2i + a, 2j + b]
        logit = logit.view(r, m, m, 2, 2).permute(0, 1, 3, 2, 4).reshape(r, 2 * m, 2 * m)
        return logit.sigmoid()
