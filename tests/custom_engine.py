"""A user's engine from outside the package, for tests/integration/test_custom_engine.py: "ENGINE": "custom_engine:Boxes".

The tests put this folder on the server's PYTHONPATH; this is the example of docs/engines.md."""

from __future__ import annotations

import numpy as np

from dd.config.engines import Option
from dd.worker.engines.base import Detections, Engine, EngineInput


class Boxes(Engine):
    """One box per image, the whole image, of category 1 with score `score` (an option)."""

    name = "boxes"
    options = {"score": Option(float, 0.9, "the score of the one box")}

    def load(self) -> None:
        self.score = float(self.config.engine_options.get("score", 0.9))

    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        out = []
        for item in batch:
            h, w = item.color.shape[:2]
            n = int(self.score >= item.score_threshold)
            masks = np.ones((n, h, w), dtype=bool) if want_masks else None
            out.append(Detections(np.array([[0, 0, w, h]] * n, dtype=np.float32),
                                  np.array([self.score] * n, dtype=np.float32), np.ones(n, dtype=np.int64), masks))
        return out
