"""The fast engine's CPU path on a model that carries detectron2's semantics, against detectron2's
inference rules written plainly (tests/d2_reference.py): same weights, same answers, RGB and RGB-D,
on the fixed-shape path and the dynamic one.

detectron2's checkpoints load into torchvision's module tree elsewhere (dd/models); here a torchvision
MaskRCNN with random weights is given `semantics = DETECTRON2` and poolers with detectron2's sampling
ratio (0), which is all the engine reads. The reference resizes RGB images with PIL itself, so this
also checks pil_resize inside the engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torchvision.ops import MultiScaleRoIAlign

from dd.config import load_model_config
from dd.models.model_folder import random_model_folder
from dd.models.semantics import DETECTRON2, TORCHVISION
from dd.worker.engines.fast import engine as fast_maskrcnn
from dd.worker.engines.base import Detections, EngineInput
from dd.worker.engines.fast.canvases import image_row
from dd.worker.engines.fast.engine import FastMaskRCNN
from tests import d2_reference
from tests.conftest import scene
from tests.integration.test_fast_engine import _spread_scores

# 233 x 347 to a shorter side of 192, longer at most 256: detectron2 rounds 171.9 rows to 172,
# torchvision floors them to 171 (and 347 * 0.7377 columns to 255).
SIZE = (233, 347)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fast_d2")
    random_model_folder(root / "rgbd", input_kind="rgbd", seed=1, min_size=192, max_size=256, score_threshold=0.05)
    random_model_folder(root / "rgb", input_kind="rgb", seed=2, categories=["carton", "bag", "box"], min_size=192,
                        max_size=256, score_threshold=0.05)
    for name in ("rgbd", "rgb"):
        _spread_scores(root / name)
        _shape_masks(root / name)
    return root


def _shape_masks(folder: Path) -> None:
    """Random weights predict nearly the same mask logit everywhere (all pixels off, which no paste rule
    could tell apart): the logits are spread and centred so that about half of each mask is on."""
    path = folder / "model.pth"
    state = torch.load(path, weights_only=True)
    state["roi_heads.box_head.fc6.weight"] *= 3
    state["roi_heads.box_head.fc7.weight"] *= 3
    state["roi_heads.mask_predictor.mask_fcn_logits.weight"] *= 1000
    torch.save(state, path)
    cfg = load_model_config(folder)
    model = _as_detectron2(fast_maskrcnn.build_loaded_model(cfg)).eval()
    seen = []
    model.roi_heads.mask_predictor.register_forward_hook(lambda module, args, out: seen.append(out))
    item = _items(cfg.input_kind == "rgbd")[0]
    d2_reference.infer(model, item.color, item.depth, cfg.min_size, cfg.max_size, 0.05, cfg.depth_fill)
    state["roi_heads.mask_predictor.mask_fcn_logits.bias"] -= seen[0].transpose(0, 1).flatten(1).median(1).values
    torch.save(state, path)


def _as_detectron2(model: torch.nn.Module) -> torch.nn.Module:
    """What the engine reads of a detectron2 model: its semantics, and poolers with sampling ratio 0.
    Fewer proposals than the default 1000 pass the RPN, so that how they are ranked matters."""
    model.semantics = DETECTRON2
    heads = model.roi_heads
    heads.box_roi_pool = MultiScaleRoIAlign(heads.box_roi_pool.featmap_names, 7, 0)
    heads.mask_roi_pool = MultiScaleRoIAlign(heads.mask_roi_pool.featmap_names, 14, 0)
    model.rpn._post_nms_top_n = dict(training=2000, testing=100)
    model.rpn.min_size = 0.0  # PROPOSAL_GENERATOR.MIN_SIZE
    return model


def _fast(folder: Path, monkeypatch: pytest.MonkeyPatch, semantics: bool = True, **options: object) -> FastMaskRCNN:
    build = fast_maskrcnn.build_loaded_model
    if semantics:
        monkeypatch.setattr(fast_maskrcnn, "build_loaded_model", lambda cfg: _as_detectron2(build(cfg)))
    cfg = dataclasses.replace(load_model_config(folder), engine_options={"allow_cpu": True, **options})
    engine = FastMaskRCNN(cfg, "cpu")
    engine.load()
    monkeypatch.setattr(fast_maskrcnn, "build_loaded_model", build)
    return engine


def _reference(folder: Path, items: list[EngineInput]) -> list[Detections]:
    cfg = load_model_config(folder)
    model = _as_detectron2(fast_maskrcnn.build_loaded_model(cfg)).eval()
    out = []
    for it in items:
        boxes, scores, labels, masks = d2_reference.infer(model, it.color, it.depth, cfg.min_size, cfg.max_size,
                                                          it.score_threshold, cfg.depth_fill, cfg.mask_threshold)
        out.append(Detections(boxes, scores, labels.astype(np.int64), masks))
    return out


def _assert_same(ref: Detections, fast: Detections, height: int, width: int) -> None:
    """Same instances (matched by class and box; of exactly tied scores either may be kept), same
    scores, same masks up to a few pixels: the mask logits here are spread a thousandfold (_shape_masks),
    so a pixel within float rounding of the threshold can fall either way (the fixed path's mask head
    computes each detection's own class with its biases fused, the reference torchvision's whole head)."""
    assert len(ref.scores) == len(fast.scores) > 0
    assert ref.masks is not None and fast.rle is not None
    unmatched, exact, compared = set(range(len(ref.scores))), 0, 0
    for i in range(len(fast.scores)):
        j = next((j for j in sorted(unmatched) if ref.labels[j] == fast.labels[i]
                  and np.allclose(ref.boxes[j], fast.boxes[i], atol=1e-3)), None)
        if j is None:  # a tie at the last place, or between two boxes of a class
            tie = [j for j in unmatched
                   if ref.labels[j] == fast.labels[i] and abs(ref.scores[j] - fast.scores[i]) < 1e-7]
            assert tie or abs(fast.scores[i] - ref.scores.min()) < 1e-7, f"fast instance {i} has no reference twin"
            if tie:
                unmatched.discard(tie[0])
            continue
        unmatched.discard(j)
        assert abs(ref.scores[j] - fast.scores[i]) < 1e-5
        mask = mask_util.decode({"size": [height, width], "counts": fast.rle[i]}).astype(bool)
        wrong = int((mask != ref.masks[j]).sum())
        assert wrong <= 3, f"instance {i}: {wrong} pixels differ"
        exact += wrong == 0
        compared += 1
    assert exact >= 0.75 * compared


def _items(rgbd: bool) -> list[EngineInput]:
    items = []
    for k, (h, w) in enumerate([SIZE, SIZE, (240, 320)]):
        color, depth = scene(k, h=h, w=w)
        items.append(EngineInput(color, depth if rgbd else None, 0.05 if k else 0.1))
    return items


def test_sizes_round_differently() -> None:
    assert DETECTRON2.resized_size(*SIZE, 192, 256) == (172, 256)
    assert TORCHVISION.resized_size(*SIZE, 192, 256) == (171, 255)


@pytest.mark.parametrize("kind", ["rgb", "rgbd"])
@pytest.mark.parametrize("options", [{}, {"fixed_shapes": False}], ids=["fixed", "dynamic"])
def test_fast_engine_gives_detectron2s_answers(models: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                               options: dict) -> None:
    fast = _fast(models / kind, monkeypatch, **options)
    assert fast.semantics is DETECTRON2 and (fast._pil is not None) == (kind == "rgb")
    items = _items(kind == "rgbd")
    for item, ref, got in zip(items, _reference(models / kind, items), fast.infer(items)):
        assert ref.masks.any(axis=(1, 2)).mean() > 0.9  # masks with something in them to compare
        _assert_same(ref, got, *item.color.shape[:2])


def test_the_rules_change_the_answers(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same weights under torchvision's rules give other answers (so the test above can fail)."""
    items = _items(rgbd=False)[:1]
    d2 = _fast(models / "rgb", monkeypatch).infer(items)[0]
    tv = _fast(models / "rgb", monkeypatch, semantics=False).infer(items)[0]
    assert len(d2.scores) and len(tv.scores)
    same = len(d2.scores) == len(tv.scores) and np.allclose(d2.boxes, tv.boxes, atol=1e-3) and d2.rle == tv.rle
    assert not same


def test_boxes_back_to_input_pixels_by_each_librarys_rules() -> None:
    """detectron2's detector_postprocess: boxes scaled by w / rw (a Python float; torch rounds it to the
    float32 that torchvision's float32 division gives), clipped to the input image, empty ones dropped,
    scores above an image's threshold; torchvision's transform only scales (its small boxes went before
    the NMS)."""
    import types

    def engine(semantics: object) -> types.SimpleNamespace:
        ns = types.SimpleNamespace(semantics=semantics, _ratios={}, dev=torch.device("cpu"))
        ns._ratio = lambda *a: FastMaskRCNN._ratio(ns, *a)
        return ns

    d2, tv = engine(DETECTRON2), engine(TORCHVISION)
    for w, rw in [(347, 255), (1280, 739), (641, 555), (333, 257), (719, 416), (1000, 877)]:
        assert torch.equal(FastMaskRCNN._ratio(d2, w, w, rw, rw), torch.tensor([w / rw] * 4, dtype=torch.float32))
        # the fixed path's per-image numbers (canvases.image_row, made on the host) hold the same ratio
        assert torch.equal(torch.from_numpy(image_row(w, w, rw, rw)[2:6]), FastMaskRCNN._ratio(d2, w, w, rw, rw))
    h, w, rh, rw = 200, 351, 316, 555  # float32(351 / 555) * 555 rounds to just above 351
    boxes = torch.tensor([[10.0, 20.0, 555.0, 316.0],  # to the resized image's edges
                          [30.0, 40.0, 30.0, 90.0],  # empty
                          [50.0, 60.0, 50.004, 60.004]])  # tiny: detectron2 keeps it
    valid = torch.ones(3, dtype=torch.bool)
    ratio = FastMaskRCNN._ratio(d2, h, w, rh, rw)
    b, v = FastMaskRCNN._to_input_pixels(d2, boxes, valid, h, w, ratio)
    assert v.tolist() == [True, False, True]
    assert float(b[0, 2]) == w and float(b[0, 3]) <= h  # clipped to the image
    # as the graph computes it: a batch of images, each with its own numbers as tensors
    row = torch.from_numpy(np.stack([image_row(h, w, rh, rw), image_row(h + 7, w - 5, rh, rw)]))
    bb, vv = FastMaskRCNN._to_input_pixels(d2, boxes.expand(2, -1, -1), valid.expand(2, -1), row[:, 6, None, None],
                                           row[:, 7, None, None], row[:, None, 2:6])
    assert torch.equal(bb[0], b) and torch.equal(vv[0], v)
    b1, v1 = FastMaskRCNN._to_input_pixels(d2, boxes, valid, h + 7, w - 5, FastMaskRCNN._ratio(d2, h + 7, w - 5, rh, rw))
    assert torch.equal(bb[1], b1) and torch.equal(vv[1], v1)
    b, v = FastMaskRCNN._to_input_pixels(tv, boxes, valid, h, w, ratio)
    assert v.all() and float(b[0, 2]) > w
    # an image's own threshold: detectron2 keeps scores above it, torchvision's engine at or above it
    scores = torch.tensor([0.5, 0.50001])
    assert FastMaskRCNN._passes(d2, scores, 0.5).tolist() == [False, True]
    assert FastMaskRCNN._passes(tv, scores, 0.5).tolist() == [True, True]
