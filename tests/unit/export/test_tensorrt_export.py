"""`deep-detection export --format tensorrt-onnx`: NVIDIA's detectron2 sample layout, checked without TensorRT.

No machine here has TensorRT, so the graph is checked structurally (plugin node types and attributes,
the plugins' documented I/O dtypes and shapes, the sample's output names) and its logic is checked by
running the same traced module in PyTorch, where the plugin nodes' forward is a reading of their docs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx_graphsurgeon")

from dd.config import load_model_config  # noqa: E402
from dd.export.network import ExportableMaskRCNN  # noqa: E402
from dd.export.onnx_export import contract_for, export_model  # noqa: E402
from dd.export.ops import TensorRTOps  # noqa: E402
from dd.export.tensorrt_graph import check_sample_layout  # noqa: E402
from dd.models.detectron2.config import read_detectron2_yaml  # noqa: E402
from dd.models.graph_layout import OUTPUTS, GraphContract  # noqa: E402
from dd.models.model_folder import random_model_folder  # noqa: E402
from dd.synth.scenes import generate_scene  # noqa: E402
from dd.worker.engines import load_engine  # noqa: E402
from dd.worker.engines.base import EngineInput  # noqa: E402
from dd.worker.engines.exported.canvas import CanvasBuilder  # noqa: E402
from dd.worker.engines.exported.decode import SampleOutputs, decode_image  # noqa: E402
from dd.models.build import build_loaded_model  # noqa: E402
from tests.d2_folders import write_d2_folder  # noqa: E402
from tests.export_parity import Parity, add  # noqa: E402


def _attrs(node) -> dict:  # noqa: ANN001
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def d2_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trt")
    src = write_d2_folder(root / "src", kind="rgbd", node={"SCORE_THRESH_TEST": 0.3})
    export_model(src, root / "out", fmt="tensorrt-onnx", size=(160, 224))
    return src, root / "out"


def test_the_graph_has_the_sample_layout_and_plugins(d2_export: tuple[Path, Path]) -> None:
    src, out = d2_export
    spec = read_detectron2_yaml(src / "config.yaml")
    contract = GraphContract.read(out)
    model = onnx.load(str(out / "model.trt.onnx"))
    assert check_sample_layout(model, contract) == []
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    nodes = {n.name: n for n in model.graph.node if n.op_type in ("EfficientNMS_TRT", "PyramidROIAlign_TRT")}
    assert set(nodes) == {"nms_rpn", "nms_box_outputs", "roi_align_box_pooler", "roi_align_mask_pooler"}
    rpn, det = _attrs(nodes["nms_rpn"]), _attrs(nodes["nms_box_outputs"])
    assert rpn["max_output_boxes"] == spec.rpn_post_nms_topk_test
    assert rpn["iou_threshold"] == pytest.approx(spec.rpn_nms_thresh)
    assert det["max_output_boxes"] == spec.detections_per_image == contract.max_detections
    assert det["iou_threshold"] == pytest.approx(spec.nms_thresh_test)
    assert det["score_threshold"] == pytest.approx(0.3) == contract.score_threshold
    box, mask = _attrs(nodes["roi_align_box_pooler"]), _attrs(nodes["roi_align_mask_pooler"])
    assert box["pooled_size"] == 7 and mask["pooled_size"] == 14 and list(box["image_size"]) == [160, 224]
    assert box["roi_coords_transform"] == mask["roi_coords_transform"] == 2  # ROIAlignV2: half-pixel offset
    assert box["sampling_ratio"] == 0 and box["fpn_scale"] == 224
    # The detections' NMS takes class-specific boxes [B, R, K, 4] and scores [B, R, K] (background dropped).
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    boxes_in, scores_in = nodes["nms_box_outputs"].input
    k = spec.num_classes
    assert shapes.get(boxes_in) == [1, spec.rpn_post_nms_topk_test, k, 4]
    assert shapes.get(scores_in) == [1, spec.rpn_post_nms_topk_test, k]
    node = json.loads((out / "node_config.json").read_text())
    assert node["DETECTION_TYPE"] == "RGBDMaskRCNNTensorRTServicer" and node["MODEL_WEIGHT"] == "model.engine"
    script = (out / "build_engine.sh").read_text()
    assert "trtexec --onnx=model.trt.onnx --saveEngine=model.engine" in script


def test_the_layout_check_finds_what_is_wrong(d2_export: tuple[Path, Path]) -> None:
    _, out = d2_export
    contract = GraphContract.read(out)
    model = onnx.load(str(out / "model.trt.onnx"))
    model.graph.output[1].name = "boxes"
    nms = next(n for n in model.graph.node if n.name == "nms_box_outputs")
    next(a for a in nms.attribute if a.name == "box_coding").i = 1
    problems = check_sample_layout(model, contract)
    assert any("outputs are" in p for p in problems)
    assert any("box_coding is 1" in p for p in problems)


def test_torchvision_resnet_models_export_with_torchvision_pooling(tmp_path: Path) -> None:
    arch = {"backbone": "resnet18", "fpn_channels": 32, "box_head_dim": 64, "mask_head_channels": 32,
            "mask_head_layers": 2, "max_detections": 30}
    src = random_model_folder(tmp_path / "src", input_kind="rgb", architecture=arch, min_size=128, max_size=192)
    export_model(src, tmp_path / "out", fmt="tensorrt-onnx")
    model = onnx.load(str(tmp_path / "out" / "model.trt.onnx"))
    assert check_sample_layout(model, GraphContract.read(tmp_path / "out")) == []
    rois = [_attrs(n) for n in model.graph.node if n.op_type == "PyramidROIAlign_TRT"]
    assert all(a["roi_coords_transform"] == 0 and a["sampling_ratio"] == 2 for a in rois)  # torchvision's RoIAlign


def test_the_traced_logic_answers_as_the_detectron2_engine(d2_export: tuple[Path, Path]) -> None:
    """The TensorRT flavour's module run in PyTorch (the plugins as their documents describe them) against the
    detectron2 engine: what a TensorRT engine built from this graph should answer, up to the plugins' own
    arithmetic (not run here)."""
    src, _ = d2_export
    cfg = load_model_config(src)
    contract = contract_for(cfg, "tensorrt-onnx", 160, 224, 1, False, cfg.score_threshold)
    module = ExportableMaskRCNN(build_loaded_model(cfg), cfg.channels, 160, 224, TensorRTOps(cfg.score_threshold))
    canvas = CanvasBuilder(contract, input_kind="rgbd", min_size=cfg.min_size, max_size=cfg.max_size,
                           depth_unit_m=cfg.depth_unit_m, depth_fill_m=contract.depth_fill_m)
    ref = load_engine(cfg, "cpu")
    acc = Parity()
    for seed in range(2):
        sc = generate_scene(10_000_000 + seed)
        item = EngineInput(sc.color, sc.depth, cfg.score_threshold)
        x, sizes, placed = canvas.build([item])
        with torch.no_grad():
            out = SampleOutputs(*module(x, sizes, torch.zeros(1)))
        det = decode_image(out, 0, placed[0], (160, 224), semantics="detectron2",
                           score_threshold=cfg.score_threshold, mask_threshold=0.5, want_masks=True)
        add(acc, ref.infer([item])[0], det, 480, 640, cfg.score_threshold + 0.05)
    s = acc.summary()
    assert acc.reference > 0 and acc.matched_fraction >= 0.97 and acc.confident_unmatched == 0, s
    assert s["max_box_dev_px"] <= 1.0 and s["max_score_dev"] <= 0.01 and s["mean_mask_iou"] >= 0.95, s
