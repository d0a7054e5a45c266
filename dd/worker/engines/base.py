"""The one interface every engine implements, and the data that crosses it.

An engine loads one model and runs a batch of decoded images. It knows nothing
about gRPC, ZeroMQ or shared memory: it gets numpy views (that may point into
shared memory) and returns numpy results.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from dd.config import ModelConfig
from dd.config.engines import Option


@dataclass
class EngineInput:
    """One decoded image. color: H x W x 3 uint8 RGB; depth: H x W uint16 (x DEPTH_UNIT metres, default mm) or
    float32 metres, or None."""

    color: np.ndarray
    depth: np.ndarray | None
    score_threshold: float  # already resolved: the request's, or the model's own


@dataclass
class Detections:
    """One image's instances, in the input image's pixels.

    labels are 1-based category indices (0 is torchvision's background);
    masks are full-image boolean masks, N x H x W, or None when not asked for;
    an engine that encodes masks itself (cheaper than full-image masks) puts
    their COCO compressed RLE strings in `rle` instead.
    """

    boxes: np.ndarray  # N x 4 float32, x1 y1 x2 y2
    scores: np.ndarray  # N float32
    labels: np.ndarray  # N int64
    masks: np.ndarray | None  # N x H x W bool
    rle: list[bytes] | None = None


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (e.g. no GPU); the worker falls back to the reference engine."""


class Engine(ABC):
    """Load once, then infer batches. Implementations are not thread-safe: one thread calls infer."""

    name: str = "engine"
    # A user's engine ("ENGINE": "package.module:ClassName") declares its ENGINE_OPTIONS keys here
    # (dd.config.engines.Option); a registered engine's are in the registry, dd.config.engines.
    options: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, config: ModelConfig, device: str) -> None:
        self.config = config
        self.device = device

    @abstractmethod
    def load(self) -> None:
        """Builds the model and reads the weights; may take seconds. Must warm up too."""

    @abstractmethod
    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        """Runs one batch; returns one Detections per input, in order."""

    def release_input_memory(self, mapping: object) -> None:
        """No more inputs will come from this shared-memory mapping (its frontend is gone): drop
        anything that refers to it, such as a page-lock registration, so that it can be unmapped.
        Called by the thread that calls infer, between batches."""

    def close(self) -> None:
        """Releases device memory; called once at worker exit."""


def depth_to_metres(depth: np.ndarray, unit_m: float = 0.001) -> np.ndarray:
    """Integer depth (the users' 16-bit PNGs) is unit_m metres per unit (DEPTH_UNIT; 0.001: millimetres),
    computed in float32; float32 depth is already metres."""
    if np.issubdtype(depth.dtype, np.integer):
        return depth.astype(np.float32) * np.float32(unit_m)
    return depth.astype(np.float32, copy=False)
