"""The fused ResNet blocks' wiring, on the CPU: cuDNN's fused operations are CUDA-only, so they are
stood in for by their definitions (convolution, + z, ReLU); the blocks must compute what they did."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from dd.worker.engines.fast.batchnorm_fold import fold_batchnorm
from dd.worker.engines.fast.fused_blocks import ConvReLU, fuse_conv_relu_pairs, fuse_resnet_blocks


def _conv_relu(x, weight, bias, stride, padding, dilation, groups):
    return F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))


def _conv_add_relu(x, weight, z, alpha, bias, stride, padding, dilation, groups):
    return F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + alpha * z)


def test_fused_resnet_fpn_computes_what_it_did(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=0).eval()
    fold_batchnorm(backbone)
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        expected = backbone(x)
        calls: list[str] = []
        monkeypatch.setattr(torch, "cudnn_convolution_relu",
                            lambda *a: calls.append("relu") or _conv_relu(*a), raising=False)
        monkeypatch.setattr(torch, "cudnn_convolution_add_relu",
                            lambda *a: calls.append("add") or _conv_add_relu(*a), raising=False)
        undo = fuse_resnet_blocks(backbone)
        got = backbone(x)
        # every bottleneck of a ResNet-50 (3 + 4 + 6 + 3): two conv+ReLU and one conv+add+ReLU; the stem
        assert calls.count("add") == 16 and calls.count("relu") == 2 * 16 + 1
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
        undo()
        torch.testing.assert_close(backbone(x)["0"], expected["0"], rtol=0, atol=0)
        assert len(calls) == 16 * 3 + 1  # undone: the original modules and forwards again


def test_unfolded_blocks_are_left_alone() -> None:
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=0).eval()
    fuse_resnet_blocks(backbone)  # batch norm not folded: nothing is fusable
    assert not any("forward" in vars(m) for m in backbone.modules())


def test_engine_keeps_the_unfused_backbone_where_cudnn_refuses(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The fast engine tries one forward with the fused blocks; if cuDNN raises, it undoes them."""
    from dd.config import DEFAULT_ARCHITECTURE, load_model_config
    from dd.models.model_folder import random_model_folder
    from dd.worker.engines.fast.engine import FastMaskRCNN

    cfg = load_model_config(random_model_folder(tmp_path / "m", input_kind="rgbd", seed=0, min_size=96, max_size=128,
                                                architecture=DEFAULT_ARCHITECTURE,
                                                extra={"ENGINE": "fast", "ENGINE_OPTIONS": {"allow_cpu": True}}))
    engine = FastMaskRCNN(cfg, "cpu")
    engine.load()
    fold_batchnorm(engine.model.backbone)
    x = torch.rand(1, 4, 64, 64)
    with torch.no_grad():
        expected = engine.model.backbone(x)["0"]

    def refuse(*_args):
        raise RuntimeError("no fused kernel for this configuration")

    monkeypatch.setattr(torch, "cudnn_convolution_relu", refuse, raising=False)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", refuse, raising=False)
    engine._fuse_backbone()
    assert "running them separately" in caplog.text
    assert not any(isinstance(m, ConvReLU) for m in engine.model.modules())  # the RPN head's conv too
    with torch.no_grad():
        torch.testing.assert_close(engine.model.backbone(x)["0"], expected, rtol=0, atol=0)


def test_conv_relu_pairs_fuse_and_undo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RPN head's conv + ReLU (a Conv2dNormActivation without norm) becomes one ConvReLU."""
    from torchvision.models.detection.rpn import RPNHead

    torch.manual_seed(0)
    head = RPNHead(16, 3).eval()
    feats = [torch.rand(1, 16, 12, 10), torch.rand(1, 16, 6, 5)]
    with torch.no_grad():
        expected = head(feats)
        calls: list[str] = []
        monkeypatch.setattr(torch, "cudnn_convolution_relu",
                            lambda *a: calls.append("relu") or _conv_relu(*a), raising=False)
        undo = fuse_conv_relu_pairs(head)
        assert sum(isinstance(m, ConvReLU) for m in head.modules()) == 1
        got = head(feats)
        assert calls == ["relu", "relu"]  # one fused call per level
        for a, b in zip(got, expected):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
        undo()
        assert not any(isinstance(m, ConvReLU) for m in head.modules())
        head(feats)
        assert len(calls) == 2


def test_fused_fpn_and_stem_pool_compute_what_they_did() -> None:
    """fuse_fpn's forward (bias, upsample and sum in one pass; biases of the output convolutions
    separately; the stem's pool without indices), with the kernels' torch definitions on the CPU."""
    from dd.worker.engines.fast.fused_blocks import StemMaxPool, fuse_fpn

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=0).eval()
    for m in backbone.fpn.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.bias, std=0.5)  # torchvision initialises them to zero: a lost bias would not show
    x = torch.rand(1, 3, 100, 132)  # odd sizes: the top-down upsampling is not an exact 2x everywhere
    with torch.no_grad():
        expected = backbone(x)
        undo = fuse_fpn(backbone)
        assert isinstance(backbone.body.maxpool, StemMaxPool) and "forward" in vars(backbone.fpn)
        got = backbone(x)
        assert list(got) == list(expected)
        for name in expected:  # float32 rounding: values up to ~60, the bias now added after the conv's rounding
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=5e-4)
        undo()
        assert isinstance(backbone.body.maxpool, torch.nn.MaxPool2d) and "forward" not in vars(backbone.fpn)


def test_engine_keeps_torchs_fpn_where_the_triton_kernels_fail(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The fast engine tries one forward with fuse_fpn's kernels; if they raise, it undoes them."""
    from dd.config import DEFAULT_ARCHITECTURE, load_model_config
    from dd.models.model_folder import random_model_folder
    from dd.worker.engines.kernels import channels_last as cl_kernels
    from dd.worker.engines.fast.engine import FastMaskRCNN
    from dd.worker.engines.fast.fused_blocks import StemMaxPool

    cfg = load_model_config(random_model_folder(tmp_path / "m", input_kind="rgb", seed=0, min_size=96, max_size=128,
                                                architecture=DEFAULT_ARCHITECTURE,
                                                extra={"ENGINE": "fast", "ENGINE_OPTIONS": {"allow_cpu": True}}))
    engine = FastMaskRCNN(cfg, "cpu")
    engine.load()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = engine.model.backbone(x)["0"]

    def refuse(*_args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cl_kernels, "max_pool_3x3_s2", refuse)
    engine._fuse_fpn()
    assert "Triton FPN kernels cannot run here" in caplog.text
    assert not any(isinstance(m, StemMaxPool) for m in engine.model.modules())
    assert "forward" not in vars(engine.model.backbone.fpn)
    with torch.no_grad():
        torch.testing.assert_close(engine.model.backbone(x)["0"], expected, rtol=0, atol=0)
