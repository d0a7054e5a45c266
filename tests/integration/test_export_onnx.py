"""`deep-detection export --format onnx` and ENGINE onnxruntime: answers equal to the source model's engine.

Bounds (CPU, fp32, synthetic 640x480 scenes; measured values in docs/tensorrt.md): every reference detection
matched (same class, box IoU >= 0.9), box corners within 0.01 px, scores within 1e-4, mask IoU >= 0.99, when
the canvas is the padded size the source model uses for the image (the default canvas for the demo models).
A small mask whose probabilities sit near 0.5 can differ in a few pixels (float summation order), so the
smallest mask IoU is bounded at 0.9 and the mean at 0.99.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dd.config import load_model_config  # noqa: E402
from dd.export.onnx_export import export_model  # noqa: E402
from dd.export.ops import ExportError  # noqa: E402
from dd.synth.scenes import generate_scene  # noqa: E402
from dd.worker.engines import load_engine  # noqa: E402
from dd.worker.engines.base import EngineInput  # noqa: E402
from dd.worker.engines.onnxruntime.session import OptionError, OrtOptions, choose_providers  # noqa: E402
from tests.d2_folders import write_d2_folder  # noqa: E402
from tests.export_parity import Parity, add  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "models"


def _parity(src: Path, out: Path, threshold: float, seeds: range) -> Parity:
    ref_cfg, exp_cfg = load_model_config(src), load_model_config(out)
    ref, exp = load_engine(ref_cfg, "cpu"), load_engine(exp_cfg, "cpu")
    acc = Parity()
    for seed in seeds:
        sc = generate_scene(10_000_000 + seed)
        item = EngineInput(sc.color, sc.depth if ref_cfg.input_kind == "rgbd" else None, threshold)
        add(acc, ref.infer([item])[0], exp.infer([item])[0], 480, 640, threshold + 0.05)
    return acc


def _assert_bounds(p: Parity) -> None:
    s = p.summary()
    assert p.reference > 0, s
    assert p.matched_fraction == 1.0 and p.confident_unmatched == 0 and p.other == p.reference, s
    assert s["max_box_dev_px"] <= 0.01 and s["max_score_dev"] <= 1e-4, s
    assert s["min_mask_iou"] >= 0.9 and s["mean_mask_iou"] >= 0.99, s


@pytest.mark.parametrize("name", ["demo-rgb", "demo-rgbd"])
def test_onnxruntime_answers_as_the_torchvision_engine_on_the_demo_models(tmp_path: Path, name: str) -> None:
    report = export_model(DEMO / name, tmp_path / name)
    assert report["canvas"] == [384, 512]
    cfg = load_model_config(tmp_path / name)
    assert cfg.engine == "onnxruntime" and cfg.input_kind == load_model_config(DEMO / name).input_kind
    _assert_bounds(_parity(DEMO / name, tmp_path / name, 0.5, range(3)))


@pytest.mark.parametrize("kind", ["rgbd", "rgb"])
def test_onnxruntime_answers_as_the_detectron2_engine(tmp_path: Path, kind: str) -> None:
    src = write_d2_folder(tmp_path / "src", kind=kind, seed=3)
    # 640x480 scenes resize to 160x213 (MIN_SIZE_TEST 160): detectron2 pads that to 160x224.
    export_model(src, tmp_path / "out", size=(160, 224))
    assert json.loads((tmp_path / "out" / "export.json").read_text())["semantics"] == "detectron2"
    _assert_bounds(_parity(src, tmp_path / "out", 0.05, range(2)))


@pytest.mark.parametrize("shape", ["batch2", "dynamic"])
def test_batched_graphs_answer_as_one_image_at_a_time_and_fit_portrait_images(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, shape: str) -> None:
    if shape == "batch2":
        export_model(DEMO / "demo-rgb", tmp_path / "b", batch=2, check=False)
    else:
        export_model(DEMO / "demo-rgb", tmp_path / "b", dynamic=True, check=False)
    cfg = load_model_config(tmp_path / "b")
    engine = load_engine(cfg, "cpu")
    scenes = [generate_scene(10_000_000 + s) for s in range(3)]
    items = [EngineInput(sc.color, None, 0.5) for sc in scenes]
    alone = [engine.infer([it])[0] for it in items]
    together = engine.infer(items)  # batch2: 2 + 1 (padded with an empty canvas); dynamic: 3 at once
    for a, b in zip(alone, together):
        assert len(a.scores) > 0 and np.array_equal(a.labels, b.labels)
        assert np.allclose(a.boxes, b.boxes, atol=1e-3) and np.allclose(a.scores, b.scores, atol=1e-5)
    portrait = EngineInput(np.ascontiguousarray(scenes[0].color.transpose(1, 0, 2)), None, 0.5)
    with caplog.at_level(logging.WARNING):
        det = engine.infer([portrait])[0]
    # a 480 x 640 (W x H) portrait: 384 x 512 by the rule, beyond the 512 x 384 canvas; 288 x 384 fits
    assert "resized to 288x384 to fit" in caplog.text
    assert det.boxes.shape[1] == 4 and (det.boxes[:, 3] <= 640 + 1e-3).all()


def test_export_refuses_what_it_cannot_export(tmp_path: Path) -> None:
    null = tmp_path / "null"
    null.mkdir()
    (null / "node_config.json").write_text(json.dumps({"DETECTION_TYPE": "RGBNullServicer", "CATEGORIES": ["a"]}))
    with pytest.raises(ExportError, match="no network to export"):
        export_model(null, tmp_path / "o1")
    with pytest.raises(ExportError, match="TensorRT's PyramidROIAlign_TRT pools exactly four FPN maps"):
        export_model(DEMO / "demo-rgb", tmp_path / "o2", fmt="tensorrt-onnx")
    with pytest.raises(ExportError, match="new folder"):
        export_model(DEMO / "demo-rgb", DEMO / "demo-rgb")
    run = subprocess.run([sys.executable, "-m", "dd", "export", str(DEMO / "demo-rgb"), "-o", str(tmp_path / "o3"),
                          "--size", "100x100"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and "multiples of 32" in run.stderr


def test_onnxruntime_options_and_providers() -> None:
    assert OrtOptions.parse({}) == OrtOptions()
    with pytest.raises(OptionError, match=r"unknown option\(s\) \['provder'\].*allowed"):
        OrtOptions.parse({"provder": "cpu"})
    with pytest.raises(OptionError, match="provider must be one of"):
        OrtOptions.parse({"provider": "gpu"})
    with pytest.raises(OptionError, match="intra_op_threads"):
        OrtOptions.parse({"intra_op_threads": -1})
    cpu_only = ["CPUExecutionProvider"]
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(cpu_only, "cpu", "auto")[0] == ["CPUExecutionProvider"]
    providers, why = choose_providers(both, "cuda:0", "auto")
    assert providers[0] == ("CUDAExecutionProvider", {"device_id": 0}) and "GPU 0" in why
    providers, why = choose_providers(cpu_only, "cuda:0", "auto")
    assert providers == ["CPUExecutionProvider"] and "pip install onnxruntime-gpu" in why
    with pytest.raises(RuntimeError, match="pip install onnxruntime-gpu"):
        choose_providers(cpu_only, "cuda:0", "cuda")
    assert choose_providers(both, "cuda:0", "cpu")[0] == ["CPUExecutionProvider"]
