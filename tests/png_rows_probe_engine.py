"""User engines for tests/integration/test_png_rows_serving.py: "ENGINE": "tests.png_rows_probe_engine:RowsProbe"
(reconstructs 16-bit PNG depth rows itself) or ":PixelsProbe" (does not declare it).

Both answer as the null engine does (a function of the pixels) and append what each image's depth
was when it reached them ("rows" or "pixels") to the file named by their `record` option, so that a
test can tell which side reconstructed it. RowsProbe reconstructs rows with the torch function the
fast engine runs on its GPU (dd.worker.engines.png_unfilter), here on the CPU, and tells the frontends
it does so on a GPU (a CPU worker would not: Engine.unfilters_png_rows_on_gpu), so that they send rows."""

from __future__ import annotations

import torch

from dd.config.engines import Option
from dd.png_rows import PngRows
from dd.worker.engines.base import EngineInput
from dd.worker.engines.null import NullEngine
from dd.worker.engines.png_unfilter import depth_to_device


class RowsProbe(NullEngine):
    name = "png-rows-probe"
    unfilters_png_rows = True
    options = {"record": Option(str, "", "file to append one line per image to: rows or pixels"),
               "instances": Option(int, 4, "instances per image")}

    def unfilters_png_rows_on_gpu(self) -> bool:
        return self.unfilters_png_rows  # as if on a GPU: frontends send rows where the class says so

    def infer(self, batch: list[EngineInput], want_masks: bool = True):
        with open(self.config.engine_options["record"], "a") as f:
            f.write("".join("rows\n" if isinstance(x.depth, PngRows) else "pixels\n" for x in batch))
        for x in batch:
            if isinstance(x.depth, PngRows):
                x.depth = depth_to_device(x.depth, torch.device("cpu")).numpy()
        return super().infer(batch, want_masks)


class PixelsProbe(RowsProbe):
    name = "png-pixels-probe"
    unfilters_png_rows = False
