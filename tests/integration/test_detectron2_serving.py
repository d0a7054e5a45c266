"""A users' detectron2 folder (checkpoint + YAML, the seed's keys only) served by a real server, RGB and RGB-D."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from dd.client import DetectorClient
from dd.config import load_model_config
from dd.worker.engines import load_engine
from dd.worker.engines.base import EngineInput
from tests.conftest import scene
from tests.d2_folders import write_d2_folder
from tests.serverproc import ServerProcess
from tests.integration.test_serving import assert_same, png


@pytest.fixture(scope="module")
def d2_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("d2models")
    write_d2_folder(root / "d2-rgbd", kind="rgbd", container="trainer", node={"SCORE_THRESH_TEST": 0.3},
                    categories=["carton", "bag"])
    write_d2_folder(root / "d2-rgb", kind="rgb", container="zoo", weights_name="model_final.pkl", seed=1,
                    node={"MIN_SIZE": 192})
    return root


def test_detectron2_folders_serve_and_answer_as_the_engine_in_process(d2_repo: Path) -> None:
    with ServerProcess(d2_repo) as server:
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
        with DetectorClient(server.target) as client:
            models = {m.name: m for m in client.list_models()}
            assert models["d2-rgbd"].engine == "detectron2" and models["d2-rgb"].engine == "detectron2"
            for name in ("d2-rgbd", "d2-rgb"):
                cfg = load_model_config(d2_repo / name)
                engine = load_engine(cfg, "cpu")
                color, depth = scene(11)
                kind_depth = depth if cfg.input_kind == "rgbd" else None
                result = client.detect(png(color), png(depth) if kind_depth is not None else None, model=name)
                det = engine.infer([EngineInput(color, kind_depth, cfg.score_threshold)])[0]
                assert_same(result, det)
                assert {i.class_name for i in result.instances} <= set(cfg.categories)
