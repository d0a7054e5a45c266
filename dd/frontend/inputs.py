"""What a request is once its protocol has been taken off: the request path's vocabulary.

Each protocol adapter (dd/frontend/protocols/) translates its messages into these
dataclasses; admission, decode and dispatch (dd.frontend.requests, dd.frontend.decode)
see nothing else, so a second protocol reuses them without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ImageInput.encoding: image file bytes (JPEG, PNG, ...), pixels as they lie in memory, or zstd-compressed pixels.
ENCODED, RAW, ZSTD = "encoded", "raw", "zstd"
# InferRequest.mask_format (the ipc request's values, which the workers' encoders read).
MASKS_RLE, MASKS_NONE = 0, 1


@dataclass(frozen=True)
class ImageInput:
    """One image as the client sent it.

    `encoding` is ENCODED, RAW or ZSTD; anything else is refused by decode with its text in the
    message (adapters pass an unknown protocol value as its string). `shape` and `dtype` (numpy
    names: "uint8", "uint16", "float32"; an adapter passes an unknown dtype as its own name) only
    matter for RAW (and ZSTD) pixels.
    """

    data: bytes | memoryview  # a memoryview: raw pixels in client shared memory (KServe), read without a copy
    encoding: str = ENCODED
    shape: tuple[int, ...] = ()
    dtype: str = ""


@dataclass
class OutputRegion:
    """Where the client wants an output written instead of in the response (KServe shared memory)."""

    output: str
    shm_key: str
    offset: int = 0
    byte_size: int = 0


@dataclass
class DetectionRequest:
    """One inference request, protocol-free.

    `protocol` names the worker's response encoder ("detector_v1", "kserve_v2"). `model` "" means
    the server's default model. `score_threshold` 0 means the model's own. `mask_format` is
    MASKS_RLE or MASKS_NONE (anything else is refused, naming the value).
    """

    protocol: str
    model: str = ""
    color: ImageInput = field(default_factory=lambda: ImageInput(b""))
    depth: ImageInput | None = None
    score_threshold: float = 0.0
    mask_format: int = MASKS_RLE
    request_id: str = ""
    model_version: str = ""
    outputs: list[str] = field(default_factory=list)
    output_regions: list[OutputRegion] = field(default_factory=list)
    trace: bool = False  # the caller wants the request's hops (Outcome.stamps)


@dataclass
class Timings:
    """The worker's reply envelope (ipc InferReply), in microseconds: for metrics, without parsing the body."""

    queue_us: int = 0
    decode_us: int = 0
    inference_us: int = 0
    encode_us: int = 0
    batch_size: int = 0


@dataclass
class Outcome:
    """A request answered: the worker's serialized response, for the adapter to send as it is."""

    body: bytes
    timings: Timings
    # For a traced request (DetectionRequest.trace): when (time.time() seconds) it passed each hop, in
    # order; HOPS names them. None otherwise.
    stamps: dict[str, float] | None = None


# A traced request's hops, in the order it passes them: the frontend admitted it (its message parsed),
# its images were decoded into the slot, it was sent to a worker; the worker's I/O thread accepted it,
# its batch left the worker's queue, the worker's inference thread sent the encoded reply; the reply
# reached this frontend. Protocol adapters add their own before and after (when the handler started,
# when it returned the response to gRPC).
HOPS = ("received", "decoded", "dispatched", "accepted", "batch_started", "replied", "arrived")
