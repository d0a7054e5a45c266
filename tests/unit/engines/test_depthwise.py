"""Depthwise convolutions on PyTorch's native CUDA kernel (fast/depthwise.py): only depthwise ones are
rerouted, the answers are the convolution's, and the memory format the next layer gets is kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models import mobilenet_v3_large

from dd.worker.engines.fast.depthwise import is_depthwise, native_depthwise


def test_only_depthwise_convolutions_are_rerouted_and_undo_restores_them() -> None:
    model = mobilenet_v3_large().eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups == c.in_channels == c.out_channels > 1]
    assert depthwise and len(depthwise) < len(convs)
    n, undo = native_depthwise(model)
    assert n == len(depthwise)
    assert all(("forward" in vars(c)) == (c in depthwise) for c in convs)
    assert not is_depthwise(nn.Conv2d(8, 16, 3, groups=8)) and not is_depthwise(nn.Conv2d(8, 8, 3, groups=2))
    assert not is_depthwise(nn.Conv2d(8, 8, 3, groups=8, padding_mode="reflect"))
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        got = model(x)  # the CPU: the same convolution
        undo()
        assert not any("forward" in vars(c) for c in convs)
        assert torch.equal(got, model(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("stride,kernel", [(1, 3), (2, 3), (1, 5), (2, 5)])
def test_on_a_gpu_the_native_kernel_gives_the_convolutions_answers(dtype: torch.dtype, stride: int, kernel: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    conv = nn.Conv2d(48, 48, kernel, stride, kernel // 2, groups=48).cuda().to(dtype)
    x = torch.randn(2, 48, 67, 91, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = conv(x)
        native_depthwise(conv)
        got = conv(x)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == want.shape
    tol = (1e-2, 2e-3) if dtype == torch.float16 else (1e-5, 1e-5)  # accumulation order: an fp16 ulp at most
    torch.testing.assert_close(got.float(), want.float(), atol=tol[0], rtol=tol[1])
