"""The one interface every engine implements, and the data that crosses it.

An engine loads one model and runs a batch of images. It knows nothing
about gRPC, ZeroMQ or shared memory: it gets numpy views (that may point into
shared memory) and returns numpy results.

A color image is decoded pixels, or, where the frontend sent a JPEG as its
compressed bytes (ServerConfig.jpeg_decode), an EncodedImage. Only an engine
that says so (`decodes_jpeg = True`: it decodes them itself, on its GPU) ever
sees one; for every other engine the worker's core decodes it on the CPU first,
with the frontend's decoder and flags, so its pixels are the frontend's.

Likewise a 16-bit depth PNG may arrive as its inflated, still filtered rows (dd.png_rows.PngRows)
where the frontend was told the engine reconstructs them on its GPU (`unfilters_png_rows = True`);
every other engine gets the depth's pixels, reconstructed by the core with numpy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Mapping, Sequence, overload

import numpy as np

from dd.config import ModelConfig
from dd.config.engines import Option
from dd.png_rows import PngRows


@dataclass
class EncodedImage:
    """A color image still compressed: `data` is its bytes (a 1-D uint8 view of the ring slot, no copy),
    `height` x `width` the size its header announced (checked by the frontend against the limits). It
    decodes to H x W x 3 uint8 RGB, pixels as stored (EXIF orientation ignored, as the frontend does)."""

    data: np.ndarray
    height: int
    width: int
    format: str = "jpeg"


class InputError(ValueError):
    """The request's own image is bad (a JPEG that does not decode, or decodes to another size than its
    header said): that request alone gets INVALID_ARGUMENT with this message."""


def image_size(color: "np.ndarray | EncodedImage") -> tuple[int, int]:
    """(height, width) of a color input, decoded or not."""
    if isinstance(color, EncodedImage):
        return color.height, color.width
    return int(color.shape[0]), int(color.shape[1])


class RleText(Sequence[bytes]):
    """COCO compressed RLE strings that lie one after another in one buffer, as an engine that encodes
    them on its device reads them back: a sequence of bytes (each item is a copy of its string, as a
    list of bytes would give it), and views() of the strings without a copy, for a response encoder
    that writes them straight into its response (detector_v1). A GPU batch of 16 images with 100
    instances each carries megabytes of them with random weights; copying them out one by one, then
    into a protobuf message and again when serializing, cost the worker's one inference thread 4-5 ms
    a batch on the H200's host (BENCHMARKS.md, S12-4)."""

    __slots__ = ("_data", "_bounds")

    def __init__(self, data: np.ndarray | bytes | memoryview, bounds: list[int]) -> None:
        """data: the strings back to back (e.g. a uint8 array); bounds: where each starts, then where
        the last ends (len(self) + 1 offsets, non-decreasing)."""
        self._data = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        self._bounds = bounds

    def __len__(self) -> int:
        return len(self._bounds) - 1

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> "RleText": ...

    def __getitem__(self, i: int | slice) -> "bytes | RleText":
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                picked = self.views()[i]
                return RleText(b"".join(picked), _offsets([len(v) for v in picked]))
            return RleText(self._data, self._bounds[start:max(start, stop) + 1])
        n = len(self)
        if not -n <= i < n:
            raise IndexError("RLE string index out of range")
        i %= n
        return bytes(self._data[self._bounds[i]:self._bounds[i + 1]])

    def __iter__(self) -> Iterator[bytes]:
        return (bytes(v) for v in self.views())

    def take(self, index: np.ndarray) -> "RleText":
        """The strings at these increasing positions: a view where they are consecutive (the usual case,
        an image's kept detections), else a copy of them."""
        if len(index) == 0:
            return RleText(self._data[:0], [0])
        lo, hi = int(index[0]), int(index[-1]) + 1
        if hi - lo == len(index):
            return self[lo:hi]
        picked = [self._data[self._bounds[k]:self._bounds[k + 1]] for k in index.tolist()]
        return RleText(b"".join(picked), _offsets([len(v) for v in picked]))

    def views(self) -> list[memoryview]:
        """Each string as a view of the buffer (valid while this object or the view lives)."""
        b = self._bounds
        return [self._data[b[k]:b[k + 1]] for k in range(len(b) - 1)]

    def lengths(self) -> np.ndarray:
        """Each string's length (int64), from the bounds at once: an encoder needs them all."""
        return np.diff(np.asarray(self._bounds, dtype=np.int64))

    def nbytes(self) -> int:
        """The strings' bytes together."""
        return self._bounds[-1] - self._bounds[0]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (RleText, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self.views(), other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"RleText({list(self)!r})"


def _offsets(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


@dataclass
class EngineInput:
    """One image. color: H x W x 3 uint8 RGB, or an EncodedImage for an engine with decodes_jpeg; depth:
    H x W uint16 (x DEPTH_UNIT metres, default mm) or float32 metres, a PngRows (uint16) for an engine with
    unfilters_png_rows, or None."""

    color: "np.ndarray | EncodedImage"
    depth: "np.ndarray | PngRows | None"
    score_threshold: float  # already resolved: the request's, or the model's own


@dataclass
class Detections:
    """One image's instances, in the input image's pixels.

    labels are 1-based category indices (0 is torchvision's background);
    masks are full-image boolean masks, N x H x W, or None when not asked for;
    an engine that encodes masks itself (cheaper than full-image masks) puts
    their COCO compressed RLE strings in `rle` instead (a list of bytes, or an
    RleText: the same strings in one buffer).
    """

    boxes: np.ndarray  # N x 4 float32, x1 y1 x2 y2
    scores: np.ndarray  # N float32
    labels: np.ndarray  # N int64
    masks: np.ndarray | None  # N x H x W bool
    rle: "list[bytes] | RleText | None" = None


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (e.g. no GPU); the worker falls back to the reference engine."""


class Engine(ABC):
    """Load once, then infer batches. Implementations are not thread-safe: one thread calls infer."""

    name: str = "engine"
    # A user's engine ("ENGINE": "package.module:ClassName") declares its ENGINE_OPTIONS keys here
    # (dd.config.engines.Option); a registered engine's are in the registry, dd.config.engines.
    options: ClassVar[Mapping[str, Option]] = {}
    # True: infer accepts EncodedImage colors and decodes them itself (on its GPU: worth sending JPEGs
    # compressed). False: the worker decodes them on the CPU before calling infer.
    decodes_jpeg: ClassVar[bool] = False
    # True: infer accepts PngRows depths and reconstructs them itself (dd.png_rows; on its GPU: worth
    # sending them as rows). False: the worker reconstructs them on the CPU before calling infer.
    unfilters_png_rows: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, device: str) -> None:
        self.config = config
        self.device = device
        # False when no JPEG will reach infer compressed (the worker's frontends decode every one:
        # ServerConfig.jpeg_decode "frontend"); set before load(), so that its warm-up can leave out
        # what serves only them (the fast engine: nvJPEG's set-up).
        self.receives_jpeg = True

    @abstractmethod
    def load(self) -> None:
        """Builds the model and reads the weights; may take seconds. Must warm up too."""

    @abstractmethod
    def infer(self, batch: list[EngineInput], want_masks: bool = True) -> list[Detections]:
        """Runs one batch; returns one Detections per input, in order."""

    def start(self, batch: list[EngineInput], want_masks: bool = True) -> Callable[[], list[Detections]]:
        """Starts a batch; the call returned finishes it (infer's answers, or infer's errors).

        An engine whose device works asynchronously queues the batch's device work here and returns
        at once, so that the worker encodes the previous batch's responses on the host while the
        device runs (dd/worker/pipeline.py). The worker starts the next batch before it finishes this
        one (so the device has it queued while this one's last steps run) and finishes batches in the
        order it started them, at most two at a time; it calls nothing else on the engine until
        they are finished, save prepare_input_memory and release_input_memory between them. The
        default starts nothing: the batch runs whole when finished, as infer."""
        return lambda: self.infer(batch, want_masks)

    def decodes_jpeg_on_gpu(self) -> bool:
        """Whether JPEGs should reach this engine compressed when the policy is "auto" (the worker tells the
        frontends in its Pong): it decodes them itself, and on a GPU, where that saves host CPU."""
        return self.decodes_jpeg and str(self.device).startswith("cuda")

    def unfilters_png_rows_on_gpu(self) -> bool:
        """Whether 16-bit depth PNGs should reach this engine as their filtered rows (the worker tells the
        frontends in its Pong): it reconstructs them itself, and on a GPU, where that saves host CPU."""
        return self.unfilters_png_rows and str(self.device).startswith("cuda")

    def prepare_input_memory(self, mapping: object) -> None:
        """Inputs will come from this shared-memory mapping (a frontend's ring, mmap.mmap): prepare it
        now, e.g. page-lock it, so that the first batch from it does not pay that. Called by the
        thread that calls infer, between batches (and before the worker says it is ready)."""

    def release_input_memory(self, mapping: object) -> None:
        """No more inputs will come from this shared-memory mapping (its frontend is gone): drop
        anything that refers to it, such as a page-lock registration, so that it can be unmapped.
        Called by the thread that calls infer, between batches; a started batch may still be reading
        from it (wait for it first)."""

    def close(self) -> None:
        """Releases device memory; called once at worker exit."""


def depth_to_metres(depth: np.ndarray, unit_m: float = 0.001) -> np.ndarray:
    """Integer depth (the users' 16-bit PNGs) is unit_m metres per unit (DEPTH_UNIT; 0.001: millimetres),
    computed in float32; float32 depth is already metres."""
    if np.issubdtype(depth.dtype, np.integer):
        return depth.astype(np.float32) * np.float32(unit_m)
    return depth.astype(np.float32, copy=False)
