"""A user's engine for tests/integration/test_ring_preparation.py ("ENGINE":
"tests.prepare_probe_engine:PrepareProbe"): answers as the null engine does and appends to the file
named by its `record` option one line per prepared mapping ("prepare <id>") and per image inferred
("infer <id of the mapping its pixels lie in>"), so that a test can tell whether each frontend's ring
was prepared before the first image read from it."""

from __future__ import annotations

import mmap

import numpy as np

from dd.config.engines import Option
from dd.worker.engines.base import EngineInput
from dd.worker.engines.null import NullEngine


def _mapping_of(arr: np.ndarray) -> object:
    base = arr.base
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    return base


class PrepareProbe(NullEngine):
    name = "prepare-probe"
    options = {"record": Option(str, "", "file to append prepare/infer lines to"),
               "instances": Option(int, 2, "instances per image")}

    def _record(self, line: str) -> None:
        with open(self.config.engine_options["record"], "a") as f:
            f.write(line + "\n")

    def prepare_input_memory(self, mapping: object) -> None:
        assert isinstance(mapping, mmap.mmap)
        self._record(f"prepare {id(mapping)}")

    def infer(self, batch: list[EngineInput], want_masks: bool = True):
        for x in batch:
            self._record(f"infer {id(_mapping_of(x.color))}")
        return super().infer(batch, want_masks)
