"""Engines, imported lazily by name so that a worker loads only the one it runs."""

from __future__ import annotations

import importlib

from dd.config import ModelConfig
from dd.worker.engines.base import Engine

_ENGINES = {
    "torchvision": ("dd.worker.engines.torchvision_maskrcnn", "TorchvisionMaskRCNN"),
    "null": ("dd.worker.engines.null", "NullEngine"),
}


def create_engine(config: ModelConfig, device: str) -> Engine:
    try:
        module_name, class_name = _ENGINES[config.engine]
    except KeyError:
        raise ValueError(f"engine {config.engine!r} is not available; available: {', '.join(_ENGINES)}") from None
    module = importlib.import_module(module_name)
    return getattr(module, class_name)(config, device)
