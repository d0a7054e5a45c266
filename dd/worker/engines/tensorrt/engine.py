"""The tensorrt engine: images -> canvas (on the GPU) -> the serialized TensorRT engine -> detections.

The engine file comes from `deep-detection export --format tensorrt-onnx` and
build_engine.sh (trtexec). Its score threshold is baked into EfficientNMS_TRT
(export.json's score_threshold): a request asking a lower one gets the detections
above the baked one (logged once). Batches run B images at a time (the engine's batch).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from dd.models.graph_layout import IMAGE_SIZE, INPUT, OUTPUTS, GraphContract
from dd.worker.engines.base import Detections, Engine, EngineInput
from dd.worker.engines.exported.canvas import CanvasBuilder
from dd.worker.engines.exported.decode import SampleOutputs, decode_image
from dd.worker.engines.tensorrt.bindings import check_io
from dd.worker.engines.tensorrt.runtime import TrtRunner, import_tensorrt

log = logging.getLogger(__name__)


class TensorRTMaskRCNN(Engine):
    name = "tensorrt"

    def load(self) -> None:
        cfg = self.config
        if cfg.engine_options:
            raise ValueError(f"{cfg.config_path}: ENGINE_OPTIONS: engine tensorrt takes no options, got "
                             f"{sorted(cfg.engine_options)}")
        import_tensorrt()  # the clearest error first, where TensorRT is missing
        if not self.device.startswith("cuda") or not torch.cuda.is_available():
            raise RuntimeError(f"model {cfg.name}: engine tensorrt runs on a CUDA GPU; this worker has {self.device} "
                               "(serve the --format onnx export with ENGINE onnxruntime on a CPU)")
        self.contract = c = GraphContract.read(cfg.folder)
        if c.format != "tensorrt-onnx":
            raise ValueError(f"{cfg.folder}: export.json is for format {c.format!r}; ENGINE tensorrt runs engines built "
                             "from a --format tensorrt-onnx export")
        if cfg.weights is None:
            raise ValueError(f"{cfg.config_path}: MODEL_WEIGHT must name the serialized engine (.engine / .plan)")
        self.dev = torch.device(self.device)
        self.runner = TrtRunner(cfg.weights, self.dev)
        check_io(self.runner.specs, [INPUT, IMAGE_SIZE], OUTPUTS, str(cfg.weights))
        fill = cfg.depth_fill_m if cfg.depth_fill_m is not None else c.depth_fill_m
        self.canvas = CanvasBuilder(c, input_kind=cfg.input_kind, min_size=cfg.min_size, max_size=cfg.max_size,
                                    depth_unit_m=cfg.depth_unit_m, depth_fill_m=fill, device=self.dev)
        self._low_threshold_logged = False
        log.info("model %s: TensorRT %s engine %s; canvas %dx%d, batch %d, score threshold %g baked in",
                 cfg.name, self.runner.trt.__version__, cfg.weights.name, c.height, c.width, c.batch,
                 c.score_threshold)
        h, w = c.height, c.width
        self.infer([EngineInput(np.zeros((h, w, 3), np.uint8),
                                np.zeros((h, w), np.uint16) if cfg.input_kind == "rgbd" else None, 1.0)])

    def _run(self, items: list[EngineInput], want_masks: bool) -> list[Detections]:
        c = self.contract
        x, sizes, placed = self.canvas.build(items, c.batch)
        out = SampleOutputs.from_named(self.runner.run({INPUT: x, IMAGE_SIZE: sizes}))
        out.check(len(items))
        results = []
        for i, (item, p) in enumerate(zip(items, placed)):
            if item.score_threshold < c.score_threshold and not self._low_threshold_logged:
                self._low_threshold_logged = True
                log.warning("model %s: a request asks score threshold %g, below the %g baked into the TensorRT "
                            "engine: it gets the detections above %g (export with --score-threshold to lower it)",
                            self.config.name, item.score_threshold, c.score_threshold, c.score_threshold)
            results.append(decode_image(out, i, p, (c.height, c.width), semantics=c.semantics,
                                        score_threshold=item.score_threshold,
                                        mask_threshold=self.config.mask_threshold, want_masks=want_masks))
        return results

    @torch.inference_mode()
    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        results: list[Detections] = []
        for start in range(0, len(batch), self.contract.batch):
            results += self._run(batch[start:start + self.contract.batch], want_masks)
        return results

    def close(self) -> None:
        self.runner = None
        torch.cuda.empty_cache()
