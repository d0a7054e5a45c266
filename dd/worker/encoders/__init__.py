"""Response encoders, one per public protocol: Detections -> the bytes the frontend forwards.

The worker serializes, so the frontend only forwards bytes. Which encoder answers a
request is the internal request's `protocol` field (ipc InferRequest.protocol; empty means
detector_v1, what frontends sent before the field existed). A second protocol adds a
module here and one line in ENCODERS, and nothing else in the worker.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from dd.worker.engines.base import Detections

DEFAULT_PROTOCOL = "detector_v1"
# protocol -> module with `encode(det, ctx) -> bytes`; imported on first use.
ENCODERS = {"detector_v1": "dd.worker.encoders.detector_v1", "kserve_v2": "dd.worker.encoders.kserve_v2"}


@dataclass
class Timings:
    """One request's times at the worker, in microseconds (also sent in the reply envelope)."""

    queue_us: int = 0  # dispatched by the frontend -> its batch started
    decode_us: int = 0  # image decoding: the frontend's, plus the worker's CPU decode of a JPEG sent compressed
    # its batch on the engine, started to answered: queued behind the batch before it, which was finished
    # and encoded meanwhile (pipeline.py), so at saturation up to about two batches' device time
    inference_us: int = 0
    encode_us: int = 0  # this response's encoding
    batch_size: int = 0
    total_us: int = 0  # received by the frontend -> encoded (set by the encoder)


class RequestError(Exception):
    """An answer the request itself made impossible (e.g. an output region too small for the output):
    the request fails with `code` (a gRPC status name) and `message`; the batch's others are served."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class OutputSink(Protocol):
    """Outputs the client wants written into its shared memory instead of the response
    (dd/worker/output_regions.py); `write` returns the bytes written or raises RequestError."""

    def __contains__(self, output: object) -> bool: ...

    def write(self, output: str, data: bytes) -> int: ...


@dataclass
class EncodeContext:
    """What an encoder knows besides the detections."""

    categories: tuple[str, ...]
    request_id: str
    model: str
    worker: str
    height: int
    width: int
    mask_format: int  # deep_detection.v1.MaskFormat: RLE (0) or NONE (1)
    timings: Timings  # the encoder fills in encode_us and total_us
    received_at: float = 0.0  # time.time() when the frontend got the request; 0: unknown
    outputs: tuple[str, ...] = ()  # the outputs asked for, in order (KServe); empty: every output
    model_version: str = ""  # echoed by protocols that have versions (KServe); "": the default
    output_sink: OutputSink | None = None  # outputs that go into client shared memory (KServe)


Encoder = Callable[["Detections", EncodeContext], bytes]


def encoder_for(protocol: str) -> Encoder:
    """The encode function of a protocol; ValueError names the known ones."""
    module = ENCODERS.get(protocol or DEFAULT_PROTOCOL)
    if module is None:
        raise ValueError(f"no response encoder for protocol {protocol!r}; known: {', '.join(ENCODERS)}")
    return importlib.import_module(module).encode
