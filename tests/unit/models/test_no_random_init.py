"""Models built for a checkpoint skip the random initialisation the checkpoint overwrites, and nothing else changes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from dd.config import DEFAULT_ARCHITECTURE, load_model_config
from dd.models.build import build_loaded_model
from dd.models.detectron2.convert import convert_state_dict
from dd.models.detectron2.loader import load_detectron2_model
from dd.models.detectron2.network import build_network
from dd.models.detectron2.checkpoint import read_weights
from dd.models.maskrcnn import build_maskrcnn, load_state_dict
from dd.models.model_folder import SMALL_ARCHITECTURE, random_model_folder
from dd.models.no_random_init import skip_random_init
from tests.d2_folders import write_d2_folder


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a module holds: parameters, buffers (persistent or not) and plain tensor attributes (anchors)."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        for key, value in vars(mod).items():
            values = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) \
                else [("", value)]
            for sub, v in values:
                if isinstance(v, torch.Tensor):
                    out[f"{name}.{key}.{sub}"] = v
    return out


def assert_same(a: nn.Module, b: nn.Module) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def test_random_fills_are_skipped_in_this_thread_only() -> None:
    t = torch.full((8, 4), 7.0)
    seen: dict[str, bool] = {}

    def other_thread() -> None:
        u = torch.full((64,), 7.0)
        nn.init.kaiming_uniform_(u.view(8, 8))
        seen["drawn"] = not torch.equal(u, torch.full((64,), 7.0))

    with skip_random_init():
        nn.init.kaiming_normal_(t)
        nn.init.kaiming_uniform_(t)
        nn.init.uniform_(t)
        nn.init.normal_(t)
        t.normal_()
        t.uniform_()
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert torch.equal(t, torch.full((8, 4), 7.0))
        nn.init.constant_(t[0], 1.0)  # not random: done
        assert t[0].eq(1.0).all() and t[1:].eq(7.0).all()
        assert torch.arange(3).tolist() == [0, 1, 2]
    assert seen["drawn"], "another thread's initialisation runs as usual"
    t.normal_()
    assert not t.eq(7.0).all(), "outside the block, fills fill"


@pytest.mark.parametrize("arch", [SMALL_ARCHITECTURE, DEFAULT_ARCHITECTURE], ids=["mobilenet", "r50"])
def test_a_torchvision_model_loads_the_same_as_one_built_with_random_init(tmp_path: Path, arch: dict) -> None:
    folder = random_model_folder(tmp_path / "m", architecture=arch, min_size=96, max_size=128)
    cfg = load_model_config(folder)
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    fast = build_loaded_model(cfg).eval()
    assert torch.equal(torch.get_rng_state(), rng), "no random draws while building for a checkpoint"
    mean = [*cfg.pixel_mean, cfg.depth_mean_m]
    std = [*cfg.pixel_std, cfg.depth_std_m]
    reference = build_maskrcnn(cfg.architecture, cfg.num_classes, cfg.channels, cfg.min_size, cfg.max_size,
                               mean, std, cfg.score_threshold)
    reference.load_state_dict(load_state_dict(cfg.weights))
    reference.eval()
    assert_same(fast, reference)
    if arch is SMALL_ARCHITECTURE:  # the whole network, end to end (the R50's tensors are compared above)
        x = [torch.rand(4, 96, 128, generator=torch.Generator().manual_seed(2))]
        with torch.no_grad():
            got, want = fast(x)[0], reference(x)[0]
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_a_missing_tensor_is_still_an_error_not_uninitialised_memory(tmp_path: Path) -> None:
    folder = random_model_folder(tmp_path / "m", min_size=96, max_size=128)
    cfg = load_model_config(folder)
    state = torch.load(cfg.weights, weights_only=True)
    state.pop(next(k for k in state if k.endswith("mask_predictor.mask_fcn_logits.weight")))
    torch.save(state, cfg.weights)
    with pytest.raises(ValueError, match="missing 1 keys"):
        build_loaded_model(cfg)


def test_a_detectron2_model_loads_the_same_as_one_built_with_random_init(tmp_path: Path) -> None:
    folder = write_d2_folder(tmp_path / "d2", kind="rgbd")
    cfg = load_model_config(folder)
    rng = torch.get_rng_state()
    fast = load_detectron2_model(cfg.detectron2, cfg.weights)
    assert torch.equal(torch.get_rng_state(), rng)
    reference = build_network(cfg.detectron2)
    found = read_weights(cfg.weights)
    reference.load_state_dict(convert_state_dict(found.state, cfg.detectron2, reference.state_dict()), strict=True)
    assert_same(fast, reference.eval())
