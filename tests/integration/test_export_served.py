"""An exported folder served by a real server (ENGINE onnxruntime) answers as the same engine in process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from pycocotools import mask as mask_util

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dd.client import DetectorClient  # noqa: E402
from dd.config import load_model_config  # noqa: E402
from dd.export.onnx_export import export_model  # noqa: E402
from dd.worker.engines import load_engine  # noqa: E402
from dd.worker.engines.base import EngineInput  # noqa: E402
from tests.conftest import scene  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402
from tests.integration.test_serving import assert_same, png  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "configs" / "models"


def test_an_exported_rgbd_model_serves(tmp_path: Path) -> None:
    out = tmp_path / "repo" / "exported-rgbd"
    export_model(DEMO / "demo-rgbd", out, check=False)
    cfg = load_model_config(out)
    engine = load_engine(cfg, "cpu")
    color, depth = scene(4, 480, 640)
    thr = 0.05  # a request's own threshold, below the model's 0.5: the graph takes it as an input
    det = engine.infer([EngineInput(color, depth, thr)])[0]
    h, w = color.shape[:2]
    masks = np.stack([mask_util.decode({"size": [h, w], "counts": r}) for r in det.rle]).astype(bool)
    det = dataclasses.replace(det, masks=masks, rle=None)
    with ServerProcess(tmp_path / "repo") as server:
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
        with DetectorClient(server.target) as client:
            assert {m.name: m.engine for m in client.list_models()} == {"exported-rgbd": "onnxruntime"}
            result = client.detect(png(color), png(depth), model="exported-rgbd", score_threshold=thr)
    assert_same(result, det)
