"""detectron2 parameters into the torchvision-structured network, and the network's detectron2 rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.models.detection.image_list import ImageList
from torchvision.models.resnet import BasicBlock, Bottleneck

from dd.models.detectron2.checkpoint import WeightsError, read_weights
from dd.models.detectron2.config import Detectron2Spec, read_detectron2_yaml
from dd.models.detectron2.convert import convert_state_dict
from dd.models.detectron2.network import Detectron2LevelMapper, FrozenBatchNorm, build_network, cell_anchors
from dd.models.semantics import DETECTRON2
from tests.d2_folders import RGBD_MEAN_STD, SMALL_YAML, d2_state_dict, merged

DATA = Path(__file__).parents[2] / "data" / "detectron2"


def spec_of(tmp_path: Path, over: dict | None = None, name: str = "m.yaml") -> Detectron2Spec:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(merged(SMALL_YAML, over or {})))
    return read_detectron2_yaml(path)


VARIANTS = {
    "r50": {},
    "r18": {"MODEL": {"RESNETS": {"DEPTH": 18, "RES2_OUT_CHANNELS": 64}}},
    "resnext_stride_3x3": {"MODEL": {"RESNETS": {"NUM_GROUPS": 4, "WIDTH_PER_GROUP": 2, "STRIDE_IN_1X1": False}}},
    "conv_fc_box_head": {"MODEL": {"ROI_BOX_HEAD": {"NUM_CONV": 2, "CONV_DIM": 8, "NUM_FC": 1}}},
    "conv_only_box_head": {"MODEL": {"ROI_BOX_HEAD": {"NUM_CONV": 1, "CONV_DIM": 8, "NUM_FC": 0}}},
    "agnostic": {"MODEL": {"ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": True},
                           "ROI_MASK_HEAD": {"CLS_AGNOSTIC_MASK": True, "NUM_CONV": 0}}},
    "rgbd": {"MODEL": RGBD_MEAN_STD},
    "rgb_format": {"INPUT": {"FORMAT": "RGB"}},
    "fpn_res3_to_res5": {"MODEL": {"FPN": {"IN_FEATURES": ["res3", "res4", "res5"]},
                                   "RPN": {"IN_FEATURES": ["p3", "p4", "p5", "p6"]},
                                   "ROI_HEADS": {"IN_FEATURES": ["p3", "p4", "p5"]},
                                   "ANCHOR_GENERATOR": {"SIZES": [[32, 48], [64, 96], [128, 192], [256, 384]]}}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_detectron2_weights_fill_the_network_exactly(tmp_path: Path, variant: str) -> None:
    spec = spec_of(tmp_path, VARIANTS[variant])
    model = build_network(spec)
    state = convert_state_dict(d2_state_dict(spec), spec, model.state_dict())
    assert state.keys() == model.state_dict().keys()
    model.load_state_dict(state, strict=True)
    assert model.semantics is DETECTRON2
    blocks = [m for m in model.backbone.body.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == sum({18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[spec.depth])
    assert all(isinstance(m.bn1, FrozenBatchNorm) for m in blocks)
    with torch.inference_mode():
        x = torch.randn(1, spec.channels, 96, 128)
        feats = model.backbone(x)
        assert list(feats) == [str(i) for i in range(len(spec.fpn_in_features))] + ["pool"]
        props, _ = model.rpn(ImageList(x, [(96, 120)]), feats)
        out, _ = model.roi_heads(feats, props, [(96, 120)])
        assert out[0]["masks"].shape[1:] == (1, 28, 28)


def test_stride_placement_and_widths_follow_the_yaml(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, VARIANTS["resnext_stride_3x3"])
    block = build_network(spec).backbone.body.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.conv2.groups == 4
    assert (block.conv1.out_channels, block.conv3.out_channels) == (16, 32)  # 4 groups x 2 x 2 wide; res3 = 2 x 16
    default = build_network(spec_of(tmp_path, {}, "d.yaml")).backbone.body.layer2[0]
    assert default.conv1.stride == (2, 2) and default.conv2.stride == (1, 1)  # STRIDE_IN_1X1 (detectron2's default)


def test_background_moves_first_and_class_boxes_and_masks_get_a_background_slot(tmp_path: Path) -> None:
    spec = spec_of(tmp_path)
    d2 = d2_state_dict(spec)
    tv = convert_state_dict(d2, spec, build_network(spec).state_dict())
    k = spec.num_classes
    cls_w, cls_b = d2["roi_heads.box_predictor.cls_score.weight"], d2["roi_heads.box_predictor.cls_score.bias"]
    assert torch.equal(tv["roi_heads.box_predictor.cls_score.weight"][0], cls_w[k])  # background: last -> first
    assert torch.equal(tv["roi_heads.box_predictor.cls_score.weight"][1:], cls_w[:k])
    assert torch.equal(tv["roi_heads.box_predictor.cls_score.bias"], torch.cat([cls_b[k:], cls_b[:k]]))
    box = tv["roi_heads.box_predictor.bbox_pred.weight"]
    assert box.shape[0] == 4 * (k + 1) and not box[:4].any()
    assert torch.equal(box[4:], d2["roi_heads.box_predictor.bbox_pred.weight"])
    mask = tv["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert mask.shape[0] == k + 1 and not mask[0].any()
    assert torch.equal(mask[1:], d2["roi_heads.mask_head.predictor.weight"])


def test_class_agnostic_predictions_serve_every_class(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, VARIANTS["agnostic"])
    d2 = d2_state_dict(spec)
    tv = convert_state_dict(d2, spec, build_network(spec).state_dict())
    box = tv["roi_heads.box_predictor.bbox_pred.weight"].view(spec.num_classes + 1, 4, -1)
    assert all(torch.equal(b, d2["roi_heads.box_predictor.bbox_pred.weight"]) for b in box)
    logits = tv["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    assert torch.equal(logits, d2["roi_heads.mask_head.predictor.bias"].repeat(spec.num_classes + 1))


def test_a_bgr_stem_is_reordered_so_the_network_takes_rgb(tmp_path: Path) -> None:
    """The same detectron2 weights read as FORMAT BGR take R, G, B what FORMAT RGB takes as B, G, R."""
    bgr = spec_of(tmp_path, {"MODEL": RGBD_MEAN_STD}, "bgr.yaml")
    rgb = spec_of(tmp_path, {"MODEL": RGBD_MEAN_STD, "INPUT": {"FORMAT": "RGB"}}, "rgb.yaml")
    d2 = d2_state_dict(bgr)
    a, b = build_network(bgr), build_network(rgb)
    a.load_state_dict(convert_state_dict(d2, bgr, a.state_dict()))
    b.load_state_dict(convert_state_dict(d2, rgb, b.state_dict()))
    w = d2["backbone.bottom_up.stem.conv1.weight"]
    assert torch.equal(a.backbone.body.conv1.weight, w[:, [2, 1, 0, 3]])
    assert torch.equal(b.backbone.body.conv1.weight, w)
    x = torch.randn(1, 4, 64, 64)
    with torch.inference_mode():
        fa, fb = a.backbone(x), b.backbone(x[:, [2, 1, 0, 3]])
    for key in fa:
        torch.testing.assert_close(fa[key], fb[key], rtol=1e-4, atol=1e-4)
    assert bgr.rgb_mean_std()[0] == (123.675, 116.28, 103.53, 2.0)


def test_the_real_trainer_checkpoint_loads_into_its_yamls_network() -> None:
    spec = read_detectron2_yaml(DATA / "trainer" / "config.yaml")
    model = build_network(spec)
    found = read_weights(DATA / "trainer" / "model_final.pth")
    model.load_state_dict(convert_state_dict(found.state, spec, model.state_dict()), strict=True)


@pytest.mark.parametrize("yaml_over, key, hint", [
    ({"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 3}}}, "roi_heads.box_predictor.cls_score.weight", "NUM_CLASSES"),
    ({"MODEL": {"FPN": {"OUT_CHANNELS": 8}}}, "backbone.fpn_lateral2.weight", "MODEL.FPN.OUT_CHANNELS"),
    ({"MODEL": {"ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": True}}}, "roi_heads.box_predictor.bbox_pred",
     "CLS_AGNOSTIC_BBOX_REG"),
    ({"MODEL": RGBD_MEAN_STD}, "backbone.bottom_up.stem.conv1.weight", "MODEL.PIXEL_MEAN"),
    ({"MODEL": {"ROI_MASK_HEAD": {"NUM_CONV": 3}}}, "roi_heads.mask_head.2.0", "MODEL.ROI_MASK_HEAD.NUM_CONV"),
    ({"MODEL": {"ROI_MASK_HEAD": {"NUM_CONV": 1}}}, "roi_heads.mask_head.mask_fcn2", "has no place"),
])
def test_weights_that_do_not_fit_the_yaml_name_the_key_and_what_to_check(
        tmp_path: Path, yaml_over: dict, key: str, hint: str) -> None:
    d2 = d2_state_dict(spec_of(tmp_path, {}, "trained.yaml"))
    spec = spec_of(tmp_path, yaml_over, "wrong.yaml")
    with pytest.raises(WeightsError) as info:
        convert_state_dict(d2, spec, build_network(spec).state_dict(), source="model.pth")
    assert key in str(info.value) and hint in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_anchors_are_detectron2s(tmp_path: Path) -> None:
    cells = cell_anchors((32.0, 64.0), (0.5, 1.0))
    w = math.sqrt(32 * 32 / 0.5)
    # Sizes before ratios, centred on 0, not rounded (torchvision rounds to integers).
    torch.testing.assert_close(cells[0], torch.tensor([-w / 2, -w * 0.25, w / 2, w * 0.25]))
    torch.testing.assert_close(cells[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    torch.testing.assert_close(cells[2], torch.tensor([-w, -w / 2, w, w / 2]))  # size 64, ratio 0.5
    spec = spec_of(tmp_path, {"MODEL": {"ANCHOR_GENERATOR": {"OFFSET": 0.5}}})
    gen = build_network(spec).rpn.anchor_generator
    # An 800 x 1216 input: p6 is 13 x 19 (max pool of 25 x 38), its stride still 64, not 800 // 13.
    feats = [torch.zeros(1, 1, -(-800 // s), -(-1216 // s)) for s in (4, 8, 16, 32)] + [torch.zeros(1, 1, 13, 19)]
    anchors = gen(ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1200)]), feats)[0]
    levels = gen.level_anchors([tuple(f.shape[-2:]) for f in feats], torch.device("cpu"))
    assert anchors.shape[0] == sum(len(a) for a in levels) == 3 * sum(f.shape[-1] * f.shape[-2] for f in feats)
    last = levels[-1].view(13, 19, 3, 4)
    centre = (last[..., :2] + last[..., 2:]) / 2
    torch.testing.assert_close(centre[1, 2, 0], torch.tensor([2.5 * 64, 1.5 * 64]))


def test_pooling_levels_follow_detectron2s_rule() -> None:
    mapper = Detectron2LevelMapper(2, 5)
    sides = torch.tensor([10.0, 111.9, 112.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], 1)
    assert mapper([boxes]).tolist() == [0, 0, 1, 2, 2, 3, 3]  # levels p2..p5, clamped


def test_rpn_ranks_by_logits_and_drops_only_empty_boxes(tmp_path: Path) -> None:
    """Two overlapping proposals whose probabilities are both 1.0 in float32: detectron2 keeps the higher
    logit (torchvision, ranking by probability, could keep either); a box 0.001 px wide stays (> 0)."""
    rpn = build_network(spec_of(tmp_path)).rpn
    proposals = torch.tensor([[[10.0, 10.0, 50.0, 50.0], [11.0, 10.0, 51.0, 50.0], [60.0, 60.0, 60.001, 80.0],
                               [70.0, 70.0, 70.0, 90.0]]])
    logits = torch.tensor([30.0, 31.0, 5.0, 6.0])
    assert torch.sigmoid(logits[0]) == torch.sigmoid(logits[1]) == 1.0
    boxes, scores = rpn.filter_proposals(proposals, logits.view(-1, 1), [(100, 100)], [4])
    assert scores[0].tolist() == [31.0, 5.0]
    torch.testing.assert_close(boxes[0][0], proposals[0, 1])


def test_detections_keep_tiny_boxes_and_need_a_score_above_the_threshold(tmp_path: Path) -> None:
    heads = build_network(spec_of(tmp_path)).roi_heads
    heads.score_thresh = 0.5
    k = heads.box_predictor.cls_score.out_features
    proposals = [torch.tensor([[10.0, 10.0, 10.004, 10.004], [30.0, 30.0, 60.0, 60.0]])]
    logits = torch.full((2, k), -20.0)
    logits[0, 1] = 20.0  # class 1, almost surely
    logits[1, 2], logits[1, 0] = 0.0, 0.0  # class 2 at exactly 0.5: not above the threshold
    boxes, scores, labels = heads.postprocess_detections(logits, torch.zeros(2, 4 * k), proposals, [(100, 100)])
    assert labels[0].tolist() == [1] and scores[0][0] > 0.99
    torch.testing.assert_close(boxes[0][0], proposals[0][0])  # 0.004 px: torchvision would drop it (< 1e-2)
