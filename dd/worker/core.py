"""The worker's core: a batch of decoded images -> the engine -> one encoded response each. No sockets.

The server (dd/worker/server.py) wraps it with ZeroMQ, pings and the shared-memory rings;
benchmarks and tests use it in-process. One bad request must not cost more than itself:
when the engine fails on a batch, the batch is run again one image at a time, so only the
image that fails gets an error and its neighbours are answered; an error while encoding one
response fails that response.

A color image may arrive as a compressed JPEG (EncodedImage, ServerConfig.jpeg_decode). An engine
that decodes JPEGs itself (Engine.decodes_jpeg) gets it as it is; for any other engine it is
decoded here first, on the CPU, exactly as the frontend would have; a JPEG that does not decode
fails its own request with INVALID_ARGUMENT. A depth that arrived as 16-bit PNG rows (dd.png_rows.PngRows)
is reconstructed here, with numpy, for an engine that does not do it itself (Engine.unfilters_png_rows),
so that a retry on any worker is served.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Union

import numpy as np

from dd.config import ModelConfig
from dd.logsafe import clip
from dd.metrics import Recorder
from dd.png_rows import PngRows, RowsError, unfilter
from dd.worker.encoders import ENCODERS, EncodeContext, OutputSink, RequestError, Timings, encoder_for
from dd.worker.engines.base import Detections, EncodedImage, InputError, image_size
from dd.worker.engines.jpeg_decode import decode_cpu

if TYPE_CHECKING:  # the engine modules import torch: the server imports them only after pinning the GPU
    from dd.worker.engines.base import Engine, EngineInput

log = logging.getLogger("dd.worker")

RLE = 0  # deep_detection.v1.MaskFormat.RLE (the core does not import the public proto; a test checks)
NO_MASKS = 1  # deep_detection.v1.MaskFormat.NONE


@dataclass
class WorkItem:
    """One image and what its answer needs. color: decoded pixels, or a JPEG the frontend sent compressed.
    Times are time.time() seconds (0: unknown)."""

    color: np.ndarray | EncodedImage
    depth: np.ndarray | PngRows | None
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


@dataclass
class StartedBatch:
    """A batch whose engine call has started (WorkerCore.start_batch): items refused before it, and
    the call that finishes the rest."""

    items: list[WorkItem]
    started: float  # time.time() when it left the queue
    refused: dict[int, Outcome]
    decode_us: dict[int, int]
    runnable: list[int]
    attempt: Callable[[], list["Detections"]] | None
    t_inference: float  # perf_counter() when the engine was started


def _raiser(exc: BaseException) -> Callable[[], list["Detections"]]:
    def attempt() -> list["Detections"]:
        raise exc
    return attempt


@dataclass
class InferredBatch:
    """A batch between its engine call and its encoding: per item either its final Outcome already
    (refused, or the engine failed on it) or its Detections and Timings."""

    items: list[WorkItem]
    done: list[Outcome | None]
    detections: dict[int, "Detections"]
    timings: dict[int, Timings]


class WorkerCore:
    """Runs batches through a loaded engine and encodes each answer in its request's protocol."""

    def __init__(self, model: ModelConfig, engine: "Engine", name: str, recorder: Recorder | None = None) -> None:
        self.model = model
        self.engine = engine
        self.name = name
        self.recorder = recorder or Recorder()  # does nothing unless metrics are on (dd/metrics.py)

    def run(self, items: list[WorkItem], started: float | None = None) -> list[Outcome]:
        """One Outcome per item, in order. started: time.time() when the batch left the queue."""
        return self.encode_batch(self.finish_batch(self.start_batch(items, started)))

    def start_batch(self, items: list[WorkItem], started: float | None = None) -> "StartedBatch":
        """Decodes what the engine does not and starts the engine on the rest (Engine.start: an engine
        that works asynchronously returns with its device busy). finish_batch gets the answers; the
        worker starts the next batch before it finishes this one, and the encoding half reads no
        input pixels (only their size) (dd/worker/pipeline.py)."""
        started = time.time() if started is None else started
        refused, decode_us = self._decode_for_engine(items)
        runnable = [i for i, item in enumerate(items) if i not in refused]
        t_inf = time.perf_counter()
        attempt: Callable[[], list["Detections"]] | None = None
        if runnable:
            start = getattr(self.engine, "start", None)  # an engine object that is no Engine: infer only
            if start is not None:
                try:
                    attempt = start(self._inputs([items[i] for i in runnable]),
                                    want_masks=any(items[i].wants_masks for i in runnable))
                except Exception as exc:  # noqa: BLE001 - answered as infer answers an engine error (finish_batch)
                    attempt = _raiser(exc)
        return StartedBatch(items, started, refused, decode_us, runnable, attempt, t_inf)

    def finish_batch(self, batch: "StartedBatch") -> "InferredBatch":
        """Waits for the engine's answers (an error there is retried image by image, as in infer)."""
        items, runnable = batch.items, batch.runnable
        done: list[Outcome | None] = [None] * len(items)
        for k, outcome in batch.refused.items():
            done[k] = outcome
        results = dict(zip(runnable, self.infer([items[i] for i in runnable], batch.attempt))) if runnable else {}
        inference_us = int((time.perf_counter() - batch.t_inference) * 1e6)
        if runnable:
            self.recorder.record_batch(self.model.name, len(runnable))
        detections: dict[int, "Detections"] = {}
        timings: dict[int, Timings] = {}
        for k, det in results.items():
            if isinstance(det, Outcome):
                done[k] = det
                continue
            item = items[k]
            detections[k] = det
            timings[k] = Timings(queue_us=max(0, int((batch.started - item.dispatched_at) * 1e6))
                                 if item.dispatched_at else 0,
                                 decode_us=item.decode_us + batch.decode_us.get(k, 0), inference_us=inference_us,
                                 batch_size=len(runnable))
        return InferredBatch(items, done, detections, timings)

    def encode_batch(self, batch: "InferredBatch") -> list[Outcome]:
        """The batch's host half: one encoded response per answered item (a failure to encode one
        fails only that one), the engine's refusals as they were. Touches no device."""
        out: list[Outcome] = []
        for k, item in enumerate(batch.items):
            ready = batch.done[k]
            if ready is not None:
                out.append(ready)
                continue
            timings = batch.timings[k]
            try:
                body = self.encode(item, batch.detections[k], timings)
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

    def _decode_for_engine(self, items: list[WorkItem]) -> tuple[dict[int, Outcome], dict[int, int]]:
        """Decodes, in place, the compressed colors of an engine that does not decode them itself, and
        reconstructs the PNG depth rows of one that does not reconstruct them. Returns the items refused
        (index -> INVALID_ARGUMENT) and each decoded item's decode time (us)."""
        refused: dict[int, Outcome] = {}
        times: dict[int, int] = {}
        # An object that is no Engine (tests) decodes nothing itself.
        jpeg = not getattr(self.engine, "decodes_jpeg", False)
        rows = not getattr(self.engine, "unfilters_png_rows", False)
        for k, item in enumerate(items):
            color_todo = jpeg and isinstance(item.color, EncodedImage)
            depth_todo = rows and isinstance(item.depth, PngRows)
            if not (color_todo or depth_todo):
                continue
            t0 = time.perf_counter()
            try:
                if color_todo:
                    item.color = decode_cpu(item.color)  # type: ignore[arg-type]
                if depth_todo:
                    item.depth = unfilter(item.depth.data, item.depth.height, item.depth.width)  # type: ignore[union-attr]
            except (InputError, RowsError) as exc:
                refused[k] = Outcome("INVALID_ARGUMENT", str(exc))
            times[k] = int((time.perf_counter() - t0) * 1e6)
        return refused, times

    def _inputs(self, items: list[WorkItem]) -> list["EngineInput"]:
        from dd.worker.engines.base import EngineInput

        return [EngineInput(i.color, i.depth, i.score_threshold if i.score_threshold > 0
                            else self.model.score_threshold) for i in items]

    def infer(self, items: list[WorkItem], attempt: Callable[[], list["Detections"]] | None = None
              ) -> list[Union["Detections", Outcome]]:
        """One Detections per item, or for an item the engine failed on, the Outcome to send instead
        (INVALID_ARGUMENT for an image the engine found bad, InputError; else INTERNAL). attempt: the
        batch's first try when already started (Engine.start); the retries run image by image."""
        want_masks = any(i.wants_masks for i in items)
        try:
            results = attempt() if attempt is not None else self.engine.infer(self._inputs(items),
                                                                              want_masks=want_masks)
            if len(results) != len(items):
                raise RuntimeError(f"engine returned {len(results)} results for {len(items)} images")
            return list(results)
        except Exception as exc:  # noqa: BLE001 - the engine failed this batch, the worker lives on
            if len(items) == 1:
                if isinstance(exc, InputError):
                    return [Outcome("INVALID_ARGUMENT", str(exc))]
                log.exception("worker %s: engine failed on request %s", self.name, clip(items[0].request_id))
                return [Outcome("INTERNAL", f"engine error on this image: {type(exc).__name__}: {exc}")]
            log.warning("worker %s: engine failed on a batch of %d (%s: %s); retrying one at a time",
                        self.name, len(items), type(exc).__name__, exc)
        return [self.infer([item])[0] for item in items]

    def warm_up(self) -> None:
        """Each protocol's encoder once, on a made-up answer (one instance with its mask), before the
        worker says it is ready: an encoder's import and first calls (protobuf, the RLE) otherwise
        land on the first request (4.5 instead of 1.2 ms of encoding on the CI box)."""
        h = w = 32
        masks = np.zeros((1, h, w), bool)
        masks[0, 8:24, 8:24] = True
        det = Detections(np.array([[8, 8, 24, 24]], np.float32), np.array([0.9], np.float32),
                         np.array([1], np.int64), masks)
        for protocol in ENCODERS:
            self.encode(WorkItem(np.zeros((h, w, 3), np.uint8), None, protocol=protocol), det, Timings())

    def encode(self, item: WorkItem, det: "Detections", timings: Timings) -> bytes:
        h, w = image_size(item.color)
        ctx = EncodeContext(self.model.categories, item.request_id, self.model.name, self.name, h, w,
                            item.mask_format if item.wants_masks else NO_MASKS, timings, item.received_at,
                            tuple(item.outputs), item.model_version, item.output_sink)
        return encoder_for(item.protocol)(det, ctx)
