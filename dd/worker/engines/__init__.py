"""Engines, imported lazily by name so that a worker loads only the one it runs.

Which engines exist, their classes, options and fallbacks are named once, in the
registry (dd.config.engines); a user's engine is "ENGINE": "package.module:ClassName".
"""

from __future__ import annotations

import dataclasses
import importlib
import logging

from dd import lazy_dynamo
from dd.config import ConfigError, ModelConfig
from dd.config.engines import REGISTRY, Option, check_options, is_custom
from dd.worker.engines.base import Engine, EngineUnavailable

lazy_dynamo.install()  # before any engine imports torchvision: 1.2 s less of a worker's imports (see there)

log = logging.getLogger(__name__)


def engine_class(engine: str) -> type[Engine]:
    """The class of a registered engine name or of a "package.module:ClassName" value (imported now)."""
    if is_custom(engine):
        target = engine
    else:
        spec = REGISTRY.get(engine)
        if spec is None or not spec.available:
            available = ", ".join(n for n, s in REGISTRY.items() if s.available)
            raise ValueError(f"engine {engine!r} is not available; available: {available}")
        target = spec.target
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise ConfigError(f"ENGINE {engine!r}: {module_name}.{class_name} is not a class implementing "
                          "dd.worker.engines.base.Engine")
    return cls


def create_engine(config: ModelConfig, device: str) -> Engine:
    name = config.engine
    if name == "torchvision" and config.detectron2 is not None:
        name = "detectron2"  # detectron2 weights: the reference engine is detectron2's own inference
    cls = engine_class(name)
    if is_custom(name):  # registered engines' options were checked with the config; a user's class declares its own
        options: dict[str, Option] = getattr(cls, "options", {}) or {}
        check_options(name, options, config.engine_options, str(config.config_path))
    return cls(config, device)


def load_engine(config: ModelConfig, device: str, receives_jpeg: bool = True) -> Engine:
    """Creates and loads the configured engine, or its fallback (with a log line) where it cannot run.
    `receives_jpeg`: Engine.receives_jpeg."""
    engine = create_engine(config, device)
    engine.receives_jpeg = receives_jpeg
    try:
        engine.load()
        return engine
    except EngineUnavailable as exc:
        spec = REGISTRY.get(config.engine)
        fallback = spec.fallback if spec else None
        if fallback is None:
            raise
        log.warning("engine %r cannot run here (%s); falling back to %r", config.engine, exc, fallback)
    engine = create_engine(dataclasses.replace(config, engine=fallback), device)
    engine.receives_jpeg = receives_jpeg
    engine.load()
    return engine
