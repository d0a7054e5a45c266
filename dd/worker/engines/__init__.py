"""Engines, imported lazily by name so that a worker loads only the one it runs."""

from __future__ import annotations

import dataclasses
import importlib
import logging

from dd.config import ModelConfig
from dd.worker.engines.base import Engine, EngineUnavailable

log = logging.getLogger(__name__)

_ENGINES = {
    "torchvision": ("dd.worker.engines.torchvision_maskrcnn", "TorchvisionMaskRCNN"),
    "detectron2": ("dd.worker.engines.detectron2_maskrcnn", "Detectron2MaskRCNN"),
    "fast": ("dd.worker.engines.fast_maskrcnn", "FastMaskRCNN"),
    "onnxruntime": ("dd.worker.engines.onnxruntime", "OnnxRuntimeMaskRCNN"),
    "tensorrt": ("dd.worker.engines.tensorrt", "TensorRTMaskRCNN"),
    "null": ("dd.worker.engines.null", "NullEngine"),
}
# Where an engine cannot run on this machine, the one that computes the same answers instead.
_FALLBACK = {"fast": "torchvision"}


def create_engine(config: ModelConfig, device: str) -> Engine:
    name = config.engine
    if name == "torchvision" and config.detectron2 is not None:
        name = "detectron2"  # detectron2 weights: the reference engine is detectron2's own inference
    try:
        module_name, class_name = _ENGINES[name]
    except KeyError:
        raise ValueError(f"engine {config.engine!r} is not available; available: {', '.join(_ENGINES)}") from None
    module = importlib.import_module(module_name)
    return getattr(module, class_name)(config, device)


def load_engine(config: ModelConfig, device: str) -> Engine:
    """Creates and loads the configured engine, or its fallback (with a log line) where it cannot run."""
    engine = create_engine(config, device)
    try:
        engine.load()
        return engine
    except EngineUnavailable as exc:
        fallback = _FALLBACK.get(config.engine)
        if fallback is None:
            raise
        log.warning("engine %r cannot run here (%s); falling back to %r", config.engine, exc, fallback)
    engine = create_engine(dataclasses.replace(config, engine=fallback), device)
    engine.load()
    return engine
