"""A user's engine that decodes JPEGs itself, for tests/integration/test_jpeg_in_worker.py: "ENGINE":
"tests.jpeg_probe_engine:JpegProbe".

It answers as the null engine does (a function of the pixels), decoding a compressed color with the
worker's CPU decoder, and appends what it was given ("jpeg" or "pixels") to the file named by its
`record` option, so that a test can tell which side decoded each image. At load it writes whether the
worker said JPEGs may reach it (Engine.receives_jpeg) to the file named by `record_load`."""

from __future__ import annotations

from dd.config.engines import Option
from dd.worker.engines.base import EncodedImage, EngineInput
from dd.worker.engines.jpeg_decode import decode_cpu
from dd.worker.engines.null import NullEngine


class JpegProbe(NullEngine):
    name = "jpeg-probe"
    decodes_jpeg = True
    options = {"record": Option(str, "", "file to append one line per image to: jpeg or pixels"),
               "record_load": Option(str, "", "file to write receives_jpeg to at load"),
               "instances": Option(int, 4, "instances per image")}

    def load(self) -> None:
        if self.config.engine_options.get("record_load"):
            with open(self.config.engine_options["record_load"], "w") as f:
                f.write(f"receives_jpeg={self.receives_jpeg}\n")
        super().load()

    def infer(self, batch: list[EngineInput], want_masks: bool = True):
        with open(self.config.engine_options["record"], "a") as f:
            f.write("".join("jpeg\n" if isinstance(x.color, EncodedImage) else "pixels\n" for x in batch))
        for x in batch:
            if isinstance(x.color, EncodedImage):
                x.color = decode_cpu(x.color)
        return super().infer(batch, want_masks)
