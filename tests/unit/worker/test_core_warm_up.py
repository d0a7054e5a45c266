"""The worker's response encoders warmed up before it says it is ready (WorkerCore.warm_up): an encoder's
import and first calls (protobuf, RLE) otherwise landed on the first request. Checked in a fresh
interpreter: after the warm-up, encoding a response in each protocol imports no module."""

from __future__ import annotations

from tests.fresh import run_fresh

CODE = """
import sys
import numpy as np
from dd.config import load_model_config
from dd.worker.core import WorkerCore, WorkItem
from dd.worker.encoders import ENCODERS, Timings
from dd.worker.engines.base import Detections
core = WorkerCore(load_model_config("configs/models/demo-rgbd"), None, "w")
if sys.argv[1] == "warm":
    core.warm_up()
masks = np.zeros((3, 96, 128), bool)
masks[:, 10:50, 20:90] = True
det = Detections(np.array([[20, 10, 90, 50]] * 3, np.float32), np.full(3, 0.8, np.float32), np.ones(3, np.int64), masks)
before = set(sys.modules)
for protocol in ENCODERS:
    assert core.encode(WorkItem(np.zeros((96, 128, 3), np.uint8), None, protocol=protocol), det, Timings())
print(sorted(set(sys.modules) - before))
"""


def _imported_by_first_encodes(mode: str) -> str:
    return run_fresh(CODE, mode)


def test_after_the_warm_up_the_first_responses_import_nothing() -> None:
    assert _imported_by_first_encodes("warm") == "[]"


def test_without_it_they_would() -> None:
    assert "dd.worker.encoders.kserve_v2" in _imported_by_first_encodes("cold")
