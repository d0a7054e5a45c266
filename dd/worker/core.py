"""The worker's core: a batch of decoded images -> the engine -> one encoded response each. No sockets.

The server (dd/worker/server.py) wraps it with ZeroMQ, pings and the shared-memory rings;
benchmarks and tests use it in-process. One bad request must not cost more than itself:
when the engine fails on a batch, the batch is run again one image at a time, so only the
image that fails gets an error and its neighbours are answered; an error while encoding one
response fails that response.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import numpy as np

from dd.config import ModelConfig
from dd.logsafe import clip
from dd.metrics import Recorder
from dd.worker.encoders import EncodeContext, OutputSink, RequestError, Timings, encoder_for

if TYPE_CHECKING:  # the engine modules import torch: the server imports them only after pinning the GPU
    from dd.worker.engines.base import Detections, Engine

log = logging.getLogger("dd.worker")

RLE = 0  # deep_detection.v1.MaskFormat.RLE (the core does not import the public proto; a test checks)
NO_MASKS = 1  # deep_detection.v1.MaskFormat.NONE


@dataclass
class WorkItem:
    """One decoded image and what its answer needs. Times are time.time() seconds (0: unknown)."""

    color: np.ndarray
    depth: np.ndarray | None
    score_threshold: float = 0.0  # 0: the model's own
    mask_format: int = RLE
    request_id: str = ""
    protocol: str = ""  # "" : detector_v1
    received_at: float = 0.0
    dispatched_at: float = 0.0
    decode_us: int = 0
    outputs: tuple[str, ...] = ()  # KServe's requested outputs, in order; empty: every output
    model_version: str = ""
    output_sink: OutputSink | None = None  # outputs to write into client shared memory (KServe)

    @property
    def wants_masks(self) -> bool:
        """Masks cost a paste and an RLE per instance: only when the request's answer carries them."""
        return self.mask_format == RLE and (not self.outputs or "masks" in self.outputs)


@dataclass
class Outcome:
    """One item's answer: code "OK" and the encoded body, or an error code (a grpc status name) and message."""

    code: str
    message: str = ""
    body: bytes = b""
    timings: Timings = field(default_factory=Timings)


class WorkerCore:
    """Runs batches through a loaded engine and encodes each answer in its request's protocol."""

    def __init__(self, model: ModelConfig, engine: "Engine", name: str, recorder: Recorder | None = None) -> None:
        self.model = model
        self.engine = engine
        self.name = name
        self.recorder = recorder or Recorder()  # does nothing unless metrics are on (dd/metrics.py)

    def run(self, items: list[WorkItem], started: float | None = None) -> list[Outcome]:
        """One Outcome per item, in order. started: time.time() when the batch left the queue."""
        started = time.time() if started is None else started
        if not items:
            return []
        t_inf = time.perf_counter()
        results = self.infer(items)
        inference_us = int((time.perf_counter() - t_inf) * 1e6)
        self.recorder.record_batch(self.model.name, len(items))
        out: list[Outcome] = []
        for item, det in zip(items, results):
            if isinstance(det, str):
                out.append(Outcome("INTERNAL", det))
                continue
            timings = Timings(queue_us=max(0, int((started - item.dispatched_at) * 1e6)) if item.dispatched_at
                              else 0, decode_us=item.decode_us, inference_us=inference_us, batch_size=len(items))
            try:
                body = self.encode(item, det, timings)
            except RequestError as exc:  # e.g. an output region too small: this request's own fault
                out.append(Outcome(exc.code, exc.message))
                continue
            except Exception as exc:  # noqa: BLE001 - fail this response, serve the rest
                log.exception("worker %s: cannot encode the response to request %s", self.name,
                              clip(item.request_id))
                out.append(Outcome("INTERNAL", f"cannot encode the response: {type(exc).__name__}: {exc}"))
                continue
            out.append(Outcome("OK", "", body, timings))
        return out

    def infer(self, items: list[WorkItem]) -> list[Union["Detections", str]]:
        """One Detections per item, or for an item the engine failed on, the message to send instead."""
        from dd.worker.engines.base import EngineInput

        inputs = [EngineInput(i.color, i.depth, i.score_threshold if i.score_threshold > 0
                              else self.model.score_threshold) for i in items]
        want_masks = any(i.wants_masks for i in items)
        try:
            results = self.engine.infer(inputs, want_masks=want_masks)
            if len(results) != len(items):
                raise RuntimeError(f"engine returned {len(results)} results for {len(items)} images")
            return list(results)
        except Exception as exc:  # noqa: BLE001 - the engine failed this batch, the worker lives on
            if len(items) == 1:
                log.exception("worker %s: engine failed on request %s", self.name, clip(items[0].request_id))
                return [f"engine error on this image: {type(exc).__name__}: {exc}"]
            log.warning("worker %s: engine failed on a batch of %d (%s: %s); retrying one at a time",
                        self.name, len(items), type(exc).__name__, exc)
        return [self.infer([item])[0] for item in items]

    def encode(self, item: WorkItem, det: "Detections", timings: Timings) -> bytes:
        h, w = item.color.shape[:2]
        ctx = EncodeContext(self.model.categories, item.request_id, self.model.name, self.name, h, w,
                            item.mask_format if item.wants_masks else NO_MASKS, timings, item.received_at,
                            tuple(item.outputs), item.model_version, item.output_sink)
        return encoder_for(item.protocol)(det, ctx)
