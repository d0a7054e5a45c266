"""The onnxruntime engine: images -> canvas -> the exported graph in ONNX Runtime -> detections.

The graph (dd.export) holds the network from the normalised canvas to 28 x 28 mask
probabilities; this engine does the rest as the source model's engine does:
resize and normalise (exported.canvas), decode, threshold and paste (exported.decode).
The graph takes the batch's lowest score threshold as an input (each image then keeps
its own), so a request may ask any threshold. A graph exported for a fixed batch of B
runs the images B at a time (the last group padded with empty canvases).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from dd.models.graph_layout import IMAGE_SIZE, INPUT, OUTPUTS, SCORE_THRESHOLD, GraphContract
from dd.worker.engines.base import Detections, Engine, EngineInput
from dd.worker.engines.exported.canvas import CanvasBuilder
from dd.worker.engines.exported.decode import SampleOutputs, decode_image
from dd.worker.engines.onnxruntime.session import OrtOptions, open_session

log = logging.getLogger(__name__)


class OnnxRuntimeMaskRCNN(Engine):
    name = "onnxruntime"

    def load(self) -> None:
        cfg = self.config
        self.options = OrtOptions.parse(cfg.engine_options, f"{cfg.config_path}: ENGINE_OPTIONS")
        self.contract = c = GraphContract.read(cfg.folder)
        if c.format != "onnx":
            raise ValueError(f"{cfg.folder}: the graph was exported for TensorRT ({c.format}); ENGINE onnxruntime "
                             "runs --format onnx exports")
        if cfg.weights is None:
            raise ValueError(f"{cfg.config_path}: MODEL_WEIGHT must name the exported .onnx file")
        if c.channels != cfg.channels:
            raise ValueError(f"{cfg.config_path}: DETECTION_TYPE says {cfg.input_kind.upper()} but the graph takes "
                             f"{c.channels} channels")
        self.session, why = open_session(str(cfg.weights), self.device, self.options)
        log.info("model %s: ONNX Runtime on %s; canvas %dx%d, batch %s, %s rules", cfg.name, why, c.height, c.width,
                 "dynamic" if c.dynamic_batch else c.batch, c.semantics)
        names = {i.name for i in self.session.get_inputs()}
        if names != {INPUT, IMAGE_SIZE, SCORE_THRESHOLD}:
            raise ValueError(f"{cfg.weights}: inputs {sorted(names)}; an export has {INPUT}, {IMAGE_SIZE}, "
                             f"{SCORE_THRESHOLD} (export it again)")
        fill = cfg.depth_fill_m if cfg.depth_fill_m is not None else c.depth_fill_m
        self.canvas = CanvasBuilder(c, input_kind=cfg.input_kind, min_size=cfg.min_size, max_size=cfg.max_size,
                                    depth_unit_m=cfg.depth_unit_m, depth_fill_m=fill)
        h, w = c.height, c.width  # warm-up: an empty image the size of the canvas (not logged if fitted)
        self._fitted_logged: set[tuple[int, int]] = {(h, w)}
        self.infer([EngineInput(np.zeros((h, w, 3), np.uint8),
                                np.zeros((h, w), np.uint16) if cfg.input_kind == "rgbd" else None, 1.0)])
        self._fitted_logged.clear()

    def _run(self, items: list[EngineInput], want_masks: bool) -> list[Detections]:
        c = self.contract
        x, sizes, placed = self.canvas.build(items, None if c.dynamic_batch else c.batch)
        thr = np.array([min(it.score_threshold for it in items)], np.float32)
        outs = self.session.run(list(OUTPUTS), {INPUT: x.numpy(), IMAGE_SIZE: sizes.numpy(), SCORE_THRESHOLD: thr})
        out = SampleOutputs.from_named(dict(zip(OUTPUTS, outs)))
        out.check(len(items))
        results = []
        for i, (item, p) in enumerate(zip(items, placed)):
            if p.fitted and (p.height, p.width) not in self._fitted_logged:
                self._fitted_logged.add((p.height, p.width))
                log.warning("model %s: a %dx%d image resizes beyond the graph's %dx%d canvas; resized to %dx%d to "
                            "fit (export with --size to serve it as the source model does)", self.config.name,
                            p.width, p.height, c.width, c.height, p.resized_w, p.resized_h)
            results.append(decode_image(out, i, p, (c.height, c.width), semantics=c.semantics,
                                        score_threshold=item.score_threshold,
                                        mask_threshold=self.config.mask_threshold, want_masks=want_masks))
        return results

    @torch.inference_mode()
    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        step = len(batch) if self.contract.dynamic_batch else self.contract.batch
        results: list[Detections] = []
        for start in range(0, len(batch), step):
            results += self._run(batch[start:start + step], want_masks)
        return results

    def close(self) -> None:
        self.session = None
