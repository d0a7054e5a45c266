"""An engine whose load waits for a file, for tests that must see a worker before and after its load
without depending on how long a load takes: "ENGINE": "gated_engine:Gated", ENGINE_OPTIONS {"gate": PATH}.

The tests put tests/ on the worker's PYTHONPATH (as for tests/custom_engine.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dd.config.engines import Option
from dd.worker.engines.base import Detections, Engine, EngineInput


class Gated(Engine):
    """Loads once the file `gate` exists (it writes `gate`.loading when it starts to wait); finds nothing."""

    name = "gated"
    options = {"gate": Option(str, "", "the file whose creation lets the load finish")}

    def load(self) -> None:
        gate = Path(self.config.engine_options["gate"])
        gate.with_name(gate.name + ".loading").touch()
        while not gate.exists():
            time.sleep(0.01)

    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        empty = np.zeros((0, 4), np.float32)
        return [Detections(empty, np.zeros(0, np.float32), np.zeros(0, np.int64), None) for _ in batch]
