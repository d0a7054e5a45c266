"""A user's engine for tests/integration/test_direct_replies.py ("ENGINE":
"tests.dying_engine:PrepareFailsAfterServing"): answers as the null engine does, and once it has answered,
fails to prepare a new frontend's ring. That failure is outside any batch, so it ends the worker's inference
thread: the way to test that such a worker still exits (and is restarted) once its replies have gone
straight to a frontend."""

from __future__ import annotations

from dd.worker.engines.base import EngineInput
from dd.worker.engines.null import NullEngine


class PrepareFailsAfterServing(NullEngine):
    name = "prepare-fails-after-serving"
    served = False

    def prepare_input_memory(self, mapping: object) -> None:
        if self.served:
            raise RuntimeError("tests.dying_engine: preparing a ring after serving fails")

    def infer(self, batch: list[EngineInput], want_masks: bool = True):
        self.served = True
        return super().infer(batch, want_masks)
