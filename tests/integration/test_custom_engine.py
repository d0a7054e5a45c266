"""A user's engine from outside the package, served: "ENGINE": "custom_engine:Boxes" (tests/custom_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dd.client import DetectorClient
from tests.serverproc import ServerProcess

TESTS = Path(__file__).resolve().parents[1]


def test_a_custom_engine_is_served(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "boxes"
    folder.mkdir(parents=True)
    (folder / "categories.txt").write_text("thing\n")
    (folder / "node_config.json").write_text(json.dumps({
        "DETECTION_TYPE": "RGBBoxes", "ENGINE": "custom_engine:Boxes", "ENGINE_OPTIONS": {"score": 0.75},
        "CATEGORY_FILE": "categories.txt", "SCORE_THRESH_TEST": 0.5, "DEVICES": "cpu"}))
    # tests/ itself on the server's PYTHONPATH: custom_engine is a top-level module there, not part of dd.
    with ServerProcess(tmp_path / "models", env={"PYTHONPATH": str(TESTS)}) as srv:
        srv.wait_workers_ready({"boxes": 1})
        with DetectorClient(srv.target) as client:
            result = client.detect(np.zeros((40, 60, 3), np.uint8), model="boxes")
    assert [(i.class_name, round(i.score, 4), i.box) for i in result.instances] == [("thing", 0.75, (0, 0, 60, 40))]
    assert result.instances[0].mask.all()
