"""A detectron2 YAML read as detectron2 reads it, and a detectron2 folder's node_config around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dd.config import ConfigError, load_model_config
from dd.models.detectron2.config import read_detectron2_yaml
from tests.d2_folders import SMALL_YAML, merged, write_d2_folder

DATA = Path(__file__).parents[2] / "data" / "detectron2"


def write(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_base_chain_is_resolved_relative_to_each_file_and_later_files_win(tmp_path: Path) -> None:
    # configs/Base.yaml <- configs/sub/mid.yaml <- model/model.yaml, as in detectron2's model zoo.
    write(tmp_path / "configs" / "Base.yaml", SMALL_YAML)
    write(tmp_path / "configs" / "sub" / "mid.yaml", {"_BASE_": "../Base.yaml", "INPUT": {"MIN_SIZE_TEST": 600},
                                                     "MODEL": {"ROI_HEADS": {"NUM_CLASSES": 7}}})
    write(tmp_path / "configs" / "extra.yaml", {"MODEL": {"ROI_HEADS": {"NMS_THRESH_TEST": 0.3}}})
    top = write(tmp_path / "model" / "model.yaml", {
        "_BASE_": ["../configs/sub/mid.yaml", str(tmp_path / "configs" / "extra.yaml")],
        "MODEL": {"ROI_HEADS": {"NUM_CLASSES": 3}}})
    spec = read_detectron2_yaml(top)
    assert spec.num_classes == 3  # the file itself over its bases
    assert spec.min_size_test == 600  # from the middle base
    assert spec.nms_thresh_test == pytest.approx(0.3)  # from the second base of the list
    assert spec.fpn_out_channels == 16  # from the root base
    assert spec.source == str(top)


def test_keys_left_out_take_detectron2s_defaults_and_are_listed(tmp_path: Path) -> None:
    spec = read_detectron2_yaml(write(tmp_path / "m.yaml", SMALL_YAML))
    assert spec.input_format == "BGR" and spec.pixel_mean == (103.53, 116.28, 123.675)
    assert spec.pixel_std == (1.0, 1.0, 1.0)
    assert spec.score_thresh_test == pytest.approx(0.05) and spec.nms_thresh_test == pytest.approx(0.5)
    assert spec.rpn_nms_thresh == pytest.approx(0.7) and spec.anchor_offset == 0.0
    assert spec.box_bbox_reg_weights == (10.0, 10.0, 5.0, 5.0) and spec.rpn_bbox_reg_weights == (1.0,) * 4
    assert spec.box_pooler_aligned and spec.box_pooler_sampling_ratio == 0 and spec.mask_pooler_resolution == 14
    assert spec.stride_in_1x1 and spec.num_groups == 1 and spec.resnet_norm == "FrozenBN"
    assert "MODEL.PIXEL_MEAN" in spec.defaulted and "INPUT.FORMAT" in spec.defaulted
    assert "MODEL.FPN.OUT_CHANNELS" not in spec.defaulted
    # Anchor sizes are broadcast per level as detectron2 does.
    assert spec.anchor_aspect_ratios == ((0.5, 1.0, 2.0),) * 5 and spec.anchor_sizes[4] == (512.0,)


def test_a_real_dumped_config_reads(tmp_path: Path) -> None:
    spec = read_detectron2_yaml(DATA / "trainer" / "config.yaml")
    assert spec.depth == 50 and spec.res2_out_channels == 4 and spec.num_classes == 2
    assert spec.fpn_levels == ("p2", "p3", "p4", "p5", "p6") and spec.min_size_test == 64
    assert not spec.ignored


def test_python_tuple_tag_reads_and_other_tags_are_refused(tmp_path: Path) -> None:
    text = yaml.safe_dump(SMALL_YAML).replace("MIN_SIZE_TEST: 160", "MIN_SIZE_TEST: 160\n  CROP: !!python/tuple [1, 2]")
    spec = read_detectron2_yaml(_text(tmp_path / "t.yaml", text))
    assert spec.min_size_test == 160
    evil = yaml.safe_dump(SMALL_YAML) + "X: !!python/object/apply:os.system ['touch /tmp/dd-never']\n"
    with pytest.raises(ConfigError, match="tag"):
        read_detectron2_yaml(_text(tmp_path / "e.yaml", evil))
    assert not Path("/tmp/dd-never").exists()


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("over, key, value", [
    ({"MODEL": {"RESNETS": {"DEFORM_ON_PER_STAGE": [False, True, True, True]}}}, "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
     "True"),
    ({"MODEL": {"ROI_HEADS": {"NAME": "CascadeROIHeads"}}}, "MODEL.ROI_HEADS.NAME", "CascadeROIHeads"),
    ({"MODEL": {"RESNETS": {"NORM": "GN"}}}, "MODEL.RESNETS.NORM", "GN"),
    ({"MODEL": {"FPN": {"NORM": "GN"}}}, "MODEL.FPN.NORM", "GN"),
    ({"MODEL": {"RESNETS": {"RES5_DILATION": 2}}}, "MODEL.RESNETS.RES5_DILATION", "2"),
    ({"MODEL": {"BACKBONE": {"NAME": "build_resnet_backbone"}}}, "MODEL.BACKBONE.NAME", "build_resnet_backbone"),
    ({"MODEL": {"META_ARCHITECTURE": "RetinaNet"}}, "MODEL.META_ARCHITECTURE", "RetinaNet"),
    ({"MODEL": {"META_ARCHITECTURE": "PanopticFPN"}}, "MODEL.META_ARCHITECTURE", "PanopticFPN"),
    ({"MODEL": {"KEYPOINT_ON": True}}, "MODEL.KEYPOINT_ON", "True"),
    ({"MODEL": {"MASK_ON": False}}, "MODEL.MASK_ON", "False"),
    ({"MODEL": {"ROI_MASK_HEAD": {"NAME": "PointRendMaskHead"}}}, "MODEL.ROI_MASK_HEAD.NAME", "PointRendMaskHead"),
    ({"MODEL": {"ANCHOR_GENERATOR": {"NAME": "RotatedAnchorGenerator"}}}, "MODEL.ANCHOR_GENERATOR.NAME",
     "RotatedAnchorGenerator"),
    ({"MODEL": {"PROPOSAL_GENERATOR": {"NAME": "RRPN"}}}, "MODEL.PROPOSAL_GENERATOR.NAME", "RRPN"),
    ({"MODEL": {"ROI_BOX_HEAD": {"POOLER_TYPE": "ROIPool"}}}, "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIPool"),
    ({"MODEL": {"ROI_BOX_HEAD": {"USE_SIGMOID_CE": True}}}, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True"),
    ({"MODEL": {"PIXEL_MEAN": [1.0, 2.0]}}, "MODEL.PIXEL_MEAN", "[1.0, 2.0]"),
    ({"MODEL": {"RESNETS": {"DEPTH": 200}}}, "MODEL.RESNETS.DEPTH", "200"),
    ({"MODEL": {"RPN": {"IN_FEATURES": ["p2", "p3"]}}}, "MODEL.RPN.IN_FEATURES", "p2"),
    ({"INPUT": {"FORMAT": "YUV"}}, "INPUT.FORMAT", "YUV"),
    ({"MODEL": {"ROI_HEADS": {"NMS_THRESH_TEST": "half"}}}, "MODEL.ROI_HEADS.NMS_THRESH_TEST", "half"),
])
def test_what_is_not_supported_is_refused_in_one_line_naming_file_key_and_value(
        tmp_path: Path, over: dict, key: str, value: str) -> None:
    path = write(tmp_path / "m.yaml", merged(SMALL_YAML, over))
    with pytest.raises(ConfigError) as info:
        read_detectron2_yaml(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and repr(key) in message and value in message, message


def test_a_refused_value_from_a_base_names_the_base_file(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", merged(SMALL_YAML, {"MODEL": {"ROI_HEADS": {"NAME": "CascadeROIHeads"}}}))
    top = write(tmp_path / "top.yaml", {"_BASE_": "base.yaml", "MODEL": {"ROI_HEADS": {"NUM_CLASSES": 2}}})
    with pytest.raises(ConfigError, match=f"^{base}: key 'MODEL.ROI_HEADS.NAME'"):
        read_detectron2_yaml(top)


def test_a_refused_default_says_it_is_detectron2s_default(tmp_path: Path) -> None:
    doc = merged(SMALL_YAML, {})
    del doc["MODEL"]["ROI_HEADS"]["NAME"]  # detectron2's default is Res5ROIHeads (C4)
    with pytest.raises(ConfigError, match="Res5ROIHeads.*detectron2's default"):
        read_detectron2_yaml(write(tmp_path / "m.yaml", doc))


def test_base_cycles_and_missing_bases_are_named(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {"_BASE_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_BASE_": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        read_detectron2_yaml(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", {"_BASE_": "missing.yaml"})
    with pytest.raises(ConfigError, match="missing.yaml: no such config file.*c.yaml"):
        read_detectron2_yaml(tmp_path / "c.yaml")


def test_unknown_keys_are_listed_as_ignored(tmp_path: Path) -> None:
    spec = read_detectron2_yaml(write(tmp_path / "m.yaml", merged(SMALL_YAML, {
        "MODEL": {"DEPTH_ENCODER": {"ON": True}, "RPN": {"LOSS_WEIGHT": 2.0}}, "SOLVER": {"BASE_LR": 0.1}})))
    assert spec.ignored == ("MODEL.DEPTH_ENCODER.ON",)  # RPN.LOSS_WEIGHT is detectron2's (training), SOLVER not read


# -- the folder: node_config.json + YAML + weights ------------------------------------------------------

def test_seed_keys_only_folder_is_a_detectron2_model(tmp_path: Path) -> None:
    folder = write_d2_folder(tmp_path / "m", kind="rgbd")
    cfg = load_model_config(folder)
    assert cfg.weights_format == "detectron2" and cfg.engine == "detectron2" and cfg.input_kind == "rgbd"
    spec = cfg.detectron2
    assert spec is not None and spec.channel_order == ("B", "G", "R", "D")
    assert cfg.min_size == 160 and cfg.max_size == 320 and cfg.score_threshold == pytest.approx(0.05)
    # Color normalisation in R, G, B order on the 0-1 scale every engine uses; depth's in metres.
    assert cfg.pixel_mean == pytest.approx((123.675 / 255, 116.28 / 255, 103.53 / 255))
    assert cfg.pixel_std == pytest.approx((58.395 / 255, 57.12 / 255, 57.375 / 255))
    assert (cfg.depth_mean_m, cfg.depth_std_m) == (2.0, 0.5)
    assert cfg.depth_fill_m is None and cfg.depth_fill == 0.0 and cfg.depth_unit_m == 0.001  # missing stays 0


def test_node_config_overrides_the_yaml_as_the_seed_did(tmp_path: Path) -> None:
    folder = write_d2_folder(tmp_path / "m", node={"MIN_SIZE": 128, "SCORE_THRESH_TEST": 0.8, "MAX_SIZE": 200,
                                                   "DEPTH_UNIT": 0.0001})
    cfg = load_model_config(folder)
    assert (cfg.min_size, cfg.max_size, cfg.score_threshold, cfg.depth_unit_m) == (128, 200, 0.8, 0.0001)
    assert cfg.detectron2.min_size_test == 160  # the YAML's value stays in the spec


@pytest.mark.parametrize("node, key, text", [
    ({"DETECTION_TYPE": "RGBDMaskRCNNTorchServicer"}, "DETECTION_TYPE", "3 values: an RGB model"),
    ({"CATEGORIES": ["a", "b", "c"]}, "CATEGORIES", "NUM_CLASSES"),
    ({"ARCHITECTURE": {"backbone": "resnet18"}}, "ARCHITECTURE", "YAML"),
    ({"PIXEL_MEAN": [0.5, 0.5, 0.5]}, "PIXEL_MEAN", "YAML"),
    ({"DEPTH_UNIT": 0}, "DEPTH_UNIT", "positive"),
    ({"WEIGHTS_FORMAT": "caffe2"}, "WEIGHTS_FORMAT", "auto, detectron2, torchvision"),
    ({"CONFIG_FILE": None}, "CONFIG_FILE", "YAML config they were trained with"),
    ({"ENGINE": "detectron2", "WEIGHTS_FORMAT": "torchvision"}, "ENGINE", "detectron2 weights"),
])
def test_a_folder_that_does_not_add_up_is_refused_with_the_key(tmp_path: Path, node: dict, key: str, text: str) -> None:
    folder = write_d2_folder(tmp_path / "m", node=node)
    with pytest.raises(ConfigError) as info:
        load_model_config(folder)
    assert f"key {key!r}" in str(info.value) and text in str(info.value), str(info.value)


def test_weights_format_override_beats_the_guess(tmp_path: Path) -> None:
    folder = write_d2_folder(tmp_path / "m")
    raw = json.loads((folder / "node_config.json").read_text())
    raw["WEIGHTS_FORMAT"] = "torchvision"
    (folder / "node_config.json").write_text(json.dumps(raw))
    cfg = load_model_config(folder)
    assert cfg.weights_format == "torchvision" and cfg.detectron2 is None and cfg.engine == "torchvision"


def test_torchvision_weights_with_a_yaml_keep_their_old_reading(tmp_path: Path) -> None:
    """Torchvision-format weights beside a detectron2-style YAML: only the keys the files set are read
    (now with their _BASE_), never detectron2's defaults (which would change the normalisation)."""
    from dd.models.model_folder import random_model_folder

    folder = random_model_folder(tmp_path / "tv", input_kind="rgb")
    write(folder / "base.yaml", {"INPUT": {"MIN_SIZE_TEST": 224, "MAX_SIZE_TEST": 400}})
    write(folder / "m.yaml", {"_BASE_": "base.yaml", "MODEL": {"RESNETS": {"DEPTH": 50}}})
    raw = json.loads((folder / "node_config.json").read_text())
    for k in ("MIN_SIZE", "MAX_SIZE", "ARCHITECTURE"):
        raw.pop(k, None)
    raw["CONFIG_FILE"] = "m.yaml"
    (folder / "node_config.json").write_text(json.dumps(raw))
    cfg = load_model_config(folder)
    assert cfg.weights_format == "torchvision" and cfg.detectron2 is None and cfg.engine == "torchvision"
    assert (cfg.min_size, cfg.max_size) == (224, 400) and cfg.architecture["backbone"] == "resnet50"
    assert cfg.pixel_mean == (0.485, 0.456, 0.406)  # not detectron2's default PIXEL_MEAN


def test_the_demo_models_are_read_as_before() -> None:
    root = Path(__file__).resolve().parents[3] / "configs" / "models"
    for name in ("demo-rgb", "demo-rgbd"):
        cfg = load_model_config(root / name)
        assert cfg.weights_format == "torchvision" and cfg.detectron2 is None and cfg.engine == "torchvision"
        assert cfg.depth_unit_m == 0.001
