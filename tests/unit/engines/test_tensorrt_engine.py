"""ENGINE tensorrt without TensorRT: what can run here (no machine here has TensorRT or a GPU).

The output decoding runs on arrays in the sample's documented layout; the binding logic on a stand-in
engine object offering TensorRT's tensor API (pure logic: no mocked server, and the served path, which
needs TensorRT and a GPU, is not run anywhere here); the config wiring and the refusal without TensorRT
on a real exported folder.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from dd.config import ConfigError, load_model_config
from dd.models.graph_layout import BOXES, CLASSES, IMAGE_SIZE, INPUT, MASKS, NUM_DETECTIONS, OUTPUTS, SCORES
from dd.worker.engines import create_engine
from dd.worker.engines.exported.canvas import Placed
from dd.worker.engines.exported.decode import SampleOutputs, decode_image
from dd.worker.engines.tensorrt.bindings import bind, check_io, read_specs
from dd.worker.engines.tensorrt.compat import load_failure, mismatches, read_build_info


def _layout(n_valid: int) -> dict[str, np.ndarray]:
    """One image, N = 4 rows, n_valid of them valid; canvas 100 x 200 (H x W)."""
    boxes = np.zeros((1, 4, 4), np.float32)
    boxes[0, 0] = [0.1, 0.2, 0.3, 0.6]  # canvas px: x 20..60, y 20..60
    boxes[0, 1] = [0.5, 0.5, 0.75, 1.0]  # x 100..150, y 50..100
    boxes[0, 2] = [0.0, 0.0, 0.05, 0.1]
    return {NUM_DETECTIONS: np.array([[n_valid]], np.int32), BOXES: boxes,
            SCORES: np.array([[0.9, 0.6, 0.3, 0.0]], np.float32), CLASSES: np.array([[0, 2, 1, 0]], np.int32),
            MASKS: np.ones((1, 4, 28, 28), np.float32)}


@pytest.mark.parametrize("semantics", ["torchvision", "detectron2"])
def test_decoding_the_sample_layout(semantics: str) -> None:
    out = SampleOutputs.from_named(_layout(3))
    out.check(1)
    placed = Placed(height=200, width=400, resized_h=100, resized_w=200, fitted=False)  # input = 2 x canvas
    det = decode_image(out, 0, placed, (100, 200), semantics=semantics, score_threshold=0.5, mask_threshold=0.5,
                       want_masks=True)
    assert det.labels.tolist() == [1, 3]  # 0-based classes -> 1-based; the 0.3 row is under the threshold
    assert np.allclose(det.boxes, [[40, 40, 120, 120], [200, 100, 300, 200]], atol=1e-4)
    assert np.allclose(det.scores, [0.9, 0.6])
    rle = det.rle if det.rle is not None else [r["counts"] for r in mask_util.encode(
        np.asfortranarray(det.masks.transpose(1, 2, 0).astype(np.uint8)))]
    first = mask_util.decode({"size": [200, 400], "counts": rle[0]})
    ys, xs = np.nonzero(first)
    # an all-ones 28 x 28 map covers its box (each rule pads its edge by less than a pixel)
    assert abs(xs.min() - 40) <= 1 and abs(xs.max() - 119) <= 1 and abs(ys.min() - 40) <= 1 and abs(ys.max() - 119) <= 1
    rows = decode_image(out, 0, placed, (100, 200), semantics=semantics, score_threshold=0.0, mask_threshold=0.5,
                        want_masks=False)
    assert len(rows.scores) == 3 and rows.masks is None and rows.rle is None  # only num_detections rows count


def test_outputs_off_the_layout_are_named() -> None:
    named = _layout(1)
    named[MASKS] = np.ones((1, 4, 28), np.float32)
    with pytest.raises(ValueError, match="detection_masks is"):
        SampleOutputs.from_named(named).check(1)
    del named[SCORES]
    with pytest.raises(ValueError, match="lack"):
        SampleOutputs.from_named(named)


@dataclass
class _DType:
    name: str


@dataclass
class _Mode:
    name: str


class _StandInEngine:
    """TensorRT's ICudaEngine tensor API, as documented: the sample layout with a dynamic batch."""

    tensors = [(INPUT, "INPUT", (-1, 3, 64, 96), "FLOAT"), (IMAGE_SIZE, "INPUT", (-1, 2), "FLOAT"),
               (NUM_DETECTIONS, "OUTPUT", (-1, 1), "INT32"), (BOXES, "OUTPUT", (-1, 5, 4), "FLOAT"),
               (SCORES, "OUTPUT", (-1, 5), "FLOAT"), (CLASSES, "OUTPUT", (-1, 5), "INT32"),
               (MASKS, "OUTPUT", (-1, 5, 28, 28), "HALF")]
    num_io_tensors = len(tensors)

    def _t(self, name: str) -> tuple:
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_name(self, i: int) -> str:
        return self.tensors[i][0]

    def get_tensor_mode(self, name: str) -> _Mode:
        return _Mode(self._t(name)[1])

    def get_tensor_shape(self, name: str) -> tuple:
        return self._t(name)[2]

    def get_tensor_dtype(self, name: str) -> _DType:
        return _DType(self._t(name)[3])


class _StandInContext:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        b = self.shapes[INPUT][0]
        return (b,) + tuple(_StandInEngine()._t(name)[2][1:])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True


def test_bindings_follow_the_engines_tensors() -> None:
    specs = read_specs(_StandInEngine())
    assert [s.name for s in specs if s.is_input] == [INPUT, IMAGE_SIZE]
    assert {s.name: s.dtype for s in specs}[MASKS] == torch.float16
    check_io(specs, [INPUT, IMAGE_SIZE], OUTPUTS, "model.engine")
    with pytest.raises(ValueError, match="not the export's"):
        check_io(specs, [INPUT], OUTPUTS, "model.engine")
    ctx = _StandInContext()
    feeds = {INPUT: torch.zeros(2, 3, 64, 96, dtype=torch.float64), IMAGE_SIZE: torch.ones(2, 2)}
    bufs = bind(ctx, specs, feeds, torch.device("cpu"))
    assert ctx.shapes == {INPUT: (2, 3, 64, 96), IMAGE_SIZE: (2, 2)}  # dynamic batch set from the feeds
    assert set(ctx.addresses) == {s.name for s in specs}
    assert bufs[MASKS].shape == (2, 5, 28, 28) and bufs[MASKS].dtype == torch.float16
    assert bufs["__input__" + INPUT].dtype == torch.float32  # cast to the engine's type
    assert ctx.addresses[BOXES] == bufs[BOXES].data_ptr()
    with pytest.raises(ValueError, match="the engine takes"):
        bind(ctx, specs, {INPUT: torch.zeros(1, 3, 64, 64), IMAGE_SIZE: torch.ones(1, 2)}, torch.device("cpu"))
    engine = _StandInEngine()
    engine.tensors = engine.tensors[:1] + [(IMAGE_SIZE, "INPUT", (-1, 2), "FP8")]
    engine.num_io_tensors = 2
    with pytest.raises(ValueError, match="FP8"):
        read_specs(engine)


def test_build_records_name_what_does_not_match(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    assert read_build_info(engine) is None and mismatches(None, "10.3.0", "NVIDIA H100", "9.0") == []
    (tmp_path / "model.engine.json").write_text(json.dumps(
        {"tensorrt_version": "8.6.1", "gpu_name": "NVIDIA A100", "compute_capability": "8.0"}))
    info = read_build_info(engine)
    found = mismatches(info, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert any("built with TensorRT 8.6.1, this is TensorRT 10.3.0" in m for m in found)
    assert any("compute capability 8.0 (NVIDIA A100)" in m and "9.0 (NVIDIA H100" in m for m in found)
    assert mismatches(info, "8.6.1", "NVIDIA A100", "8.0") == []
    text = load_failure(engine, info, "10.3.0", "NVIDIA H100", "9.0", ["The engine plan file is not compatible"])
    assert "TensorRT 8.6.1 on NVIDIA A100" in text and "TensorRT 10.3.0 on NVIDIA H100" in text
    assert "not compatible" in text and "build_engine.sh" in text


def _trt_folder(tmp_path: Path, with_engine: bool) -> Path:
    folder = tmp_path / "trt"
    folder.mkdir()
    (folder / "categories.txt").write_text("carton\n")
    (folder / "node_config.json").write_text(json.dumps({"DETECTION_TYPE": "RGBDMaskRCNNTensorRTServicer",
                                                         "MODEL_WEIGHT": "model.engine",
                                                         "CATEGORY_FILE": "categories.txt"}))
    if with_engine:
        (folder / "model.engine").write_bytes(b"not an engine")
    return folder


def test_tensorrt_names_are_wired_and_a_missing_engine_names_the_build_script(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="build_engine.sh"):
        load_model_config(_trt_folder(tmp_path, with_engine=False))
    (tmp_path / "trt" / "model.engine").write_bytes(b"x")
    cfg = load_model_config(tmp_path / "trt")
    assert (cfg.engine, cfg.input_kind, cfg.weights_format) == ("tensorrt", "rgbd", "tensorrt")
    assert type(create_engine(cfg, "cpu")).__name__ == "TensorRTMaskRCNN"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_the_engine_says_what_to_install(tmp_path: Path) -> None:
    cfg = load_model_config(_trt_folder(tmp_path, with_engine=True))
    with pytest.raises(RuntimeError, match=r"pip install tensorrt.*ENGINE onnxruntime"):
        create_engine(cfg, "cpu").load()
