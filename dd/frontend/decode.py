"""Request validation and image decoding, straight into a ring slot.

Runs on a thread pool (OpenCV releases the GIL while it decodes), so the event
loop keeps serving. Every refusal is a RequestError with the gRPC status a
client should get and a sentence that says what was wrong with its request;
nothing else may escape (tests/test_bad_input.py fuzzes this with hypothesis).

Everything that is cheap is checked before any pixel is decoded: that depth is
there when the model needs it, RAW lengths, and the sizes announced by both
images' headers (against max_image_pixels, each other and the slot), so a small
file cannot make the server allocate gigabytes or decode an image it will
refuse anyway.

Encoded images must be one of a few formats (ACCEPTED_FORMATS), recognised by
their first bytes: the header is then read by Pillow restricted to that format
and decoded by OpenCV, which picks its decoder by the same bytes, so the size
checked is the size decoded, and the exotic decoders OpenCV also carries are
never reached by a request. EXIF orientation is ignored: pixels are used as
stored, which is what the depth image is registered to and what the header says.
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import grpc
import numpy as np
from PIL import Image as PILImage

from dd.proto.deep_detection.v1 import detector_pb2 as pb

# Decoding must not spawn OpenCV's own thread pool inside each of ours.
cv2.setNumThreads(1)
PILImage.MAX_IMAGE_PIXELS = None  # we apply our own limit, from the config, to the header's size

_ALIGN = 64
_RAW_DTYPES = {pb.UINT8: np.uint8, pb.UINT16: np.uint16, pb.FLOAT32: np.float32}
ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
_COLOR_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
_DEPTH_FLAGS = cv2.IMREAD_UNCHANGED  # keeps 16 bits; ignores EXIF orientation
# A request's depth image decodes here while its color image decodes in the caller's thread:
# the request waits for the slower of the two instead of their sum (a noisy 16-bit PNG can
# cost as much as the JPEG). Bounded, like every pool here.
_DEPTH_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="depth-decode")


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass
class Placed:
    """Where a decoded image now lies in its slot."""

    offset: int
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Decoded:
    color: Placed
    depth: Placed | None
    height: int
    width: int


def check_threshold(value: float) -> None:
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise _invalid(f"score_threshold must be in [0, 1] (0: the model's own), got {value}")


def check_options(request: pb.DetectRequest) -> None:
    """The request's fields other than the images."""
    check_threshold(request.score_threshold)
    if request.mask_format not in (pb.RLE, pb.NONE):
        raise _invalid(f"unknown mask_format {request.mask_format}; use RLE (0) or NONE (1)")


def image_format(data: bytes) -> str | None:
    """The format of encoded image bytes, from their signature; None if not one we accept."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _header_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) from the image's header alone; refuses data that is no complete image."""
    fmt = image_format(data)
    if fmt is None:
        raise _invalid(f"{what}: not a JPEG, PNG, BMP, TIFF or WebP image (first bytes {data[:8]!r}); "
                       "send one of those, or set encoding RAW with shape and dtype")
    try:
        with PILImage.open(io.BytesIO(data), formats=[fmt]) as im:
            size = im.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for garbage
        raise _invalid(f"{what}: {fmt} data with an unreadable header ({type(exc).__name__}); "
                       "the file is corrupt or truncated") from None
    if fmt == "JPEG" and b"\xff\xd9" not in data[-64:]:
        raise _invalid(f"{what}: JPEG data is truncated (no end-of-image marker at its end)")
    if fmt == "PNG" and b"IEND" not in data[-32:]:
        raise _invalid(f"{what}: PNG data is truncated (no IEND chunk at its end)")
    return size


def _check_pixels(w: int, h: int, max_pixels: int, what: str) -> None:
    if w < 2 or h < 2:
        raise _invalid(f"{what}: {w}x{h} pixels is too small to detect anything in (at least 2x2)")
    if w * h > max_pixels:
        raise _invalid(f"{what}: {w}x{h} = {w * h} pixels exceeds this server's limit of {max_pixels} "
                       "(max_image_pixels); resize the image on the client")


def _raw_array(img: pb.Image, what: str, channels: int | None) -> np.ndarray:
    if img.dtype not in _RAW_DTYPES:
        raise _invalid(f"{what}: RAW images need dtype UINT8, UINT16 or FLOAT32, got {_dtype_name(img.dtype)}")
    dtype = np.dtype(_RAW_DTYPES[img.dtype])
    shape = tuple(int(s) for s in img.shape)
    if channels == 3:
        if len(shape) != 3 or shape[2] != 3 or dtype != np.uint8:
            raise _invalid(f"{what}: RAW color must be shape [H, W, 3] with dtype UINT8 (RGB), "
                           f"got shape {list(shape)} dtype {_dtype_name(img.dtype)}")
    else:
        if len(shape) == 3 and shape[2] == 1:
            shape = shape[:2]
        if len(shape) != 2 or dtype not in (np.uint16, np.float32):
            raise _invalid(f"{what}: RAW depth must be shape [H, W] with dtype UINT16 (mm) or FLOAT32 (m), "
                           f"got shape {list(img.shape)} dtype {_dtype_name(img.dtype)}")
    if any(s <= 0 for s in shape):
        raise _invalid(f"{what}: shape {list(shape)} has a non-positive dimension")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(img.data) != expected:
        raise _invalid(f"{what}: RAW data has {len(img.data)} bytes but shape {list(shape)} x "
                       f"{dtype.name} needs {expected}")
    return np.frombuffer(img.data, dtype=dtype).reshape(shape)


def _dtype_name(value: int) -> str:
    return pb.DType.Name(value) if value in pb.DType.values() else str(value)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def decode_into_slot(request: pb.DetectRequest, needs_depth: bool, slot: memoryview, max_pixels: int) -> Decoded:
    """Decodes color (and depth) into `slot`; color at offset 0 as H x W x 3 RGB, depth after it."""
    color_img, depth_img = request.color, request.depth
    if not color_img.data:
        raise _invalid("color.data is empty; send the image bytes (JPEG/PNG) or raw pixels")
    if needs_depth and not depth_img.data:
        raise _invalid("this model is RGB-D and needs depth: set DetectRequest.depth "
                       "(a 16-bit PNG in millimetres, or RAW UINT16/FLOAT32)")

    # 1. Sizes, from RAW shapes or headers; nothing decoded yet.
    color_raw = depth_raw = None
    if color_img.encoding == pb.Image.RAW:
        color_raw = _raw_array(color_img, "color", 3)
        h, w = color_raw.shape[:2]
    else:
        w, h = _header_size(color_img.data, "color")
    _check_pixels(w, h, max_pixels, "color")
    depth_offset = _align(h * w * 3)
    end = h * w * 3
    if needs_depth:
        if depth_img.encoding == pb.Image.RAW:
            depth_raw = _raw_array(depth_img, "depth", None)
            dh, dw = depth_raw.shape
            itemsize = depth_raw.dtype.itemsize
        else:
            dw, dh = _header_size(depth_img.data, "depth")
            itemsize = 2
        if (dw, dh) != (w, h):
            raise _invalid(f"depth is {dw}x{dh} but color is {w}x{h}; they must be the same size (registered)")
        end = depth_offset + h * w * itemsize
    if end > len(slot):
        raise _invalid(f"image needs {end} bytes of shared memory but a ring slot holds {len(slot)}; "
                       "send a smaller image or ask the operator to raise --slot-mb / max_image_pixels")

    # 2. Pixels. The depth decode (into its own array) overlaps the color decode; only this
    # thread writes into the slot, so the slot is untouched once this function returns or raises.
    depth_future: Future | None = None
    if needs_depth and depth_raw is None:
        depth_future = _DEPTH_POOL.submit(_imdecode, depth_img.data, _DEPTH_FLAGS)
    try:
        color = _decode_color(color_img, color_raw, slot, h, w)
    except BaseException:
        if depth_future is not None:
            depth_future.cancel()
        raise
    if not needs_depth:
        return Decoded(color, None, h, w)

    if depth_raw is None:
        assert depth_future is not None
        depth_raw = depth_future.result()
        if depth_raw is None:
            raise _invalid("depth: the image could not be decoded (corrupt or unsupported data)")
        if depth_raw.ndim != 2 or depth_raw.dtype != np.uint16:
            channels = 1 if depth_raw.ndim == 2 else depth_raw.shape[2]
            raise _invalid(f"depth must be a single-channel 16-bit PNG in millimetres; got {depth_raw.dtype} "
                           f"with {channels} channel(s)")
        if depth_raw.shape != (h, w):
            raise _invalid(f"depth: decoded size {depth_raw.shape[1]}x{depth_raw.shape[0]} differs from its "
                           f"header's {w}x{h}")
    if depth_raw.dtype == np.float32 and not np.isfinite(depth_raw).all():
        raise _invalid("depth (FLOAT32, metres) contains NaN or infinity; use 0 for missing pixels")
    dst = _slot_array(slot, depth_offset, depth_raw.shape, depth_raw.dtype)
    np.copyto(dst, depth_raw)
    return Decoded(color, Placed(depth_offset, tuple(depth_raw.shape), depth_raw.dtype.name), h, w)


def _decode_color(color_img: pb.Image, color_raw: np.ndarray | None, slot: memoryview, h: int, w: int) -> Placed:
    dst = _slot_array(slot, 0, (h, w, 3), np.uint8)
    if color_raw is not None:
        np.copyto(dst, color_raw)
    else:
        bgr = _imdecode(color_img.data, _COLOR_FLAGS)
        if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
            raise _invalid("color: the image could not be decoded (corrupt or unsupported data)")
        if bgr.shape[:2] != (h, w):
            raise _invalid(f"color: decoded size {bgr.shape[1]}x{bgr.shape[0]} differs from its header's {w}x{h}")
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=dst)
    return Placed(0, (h, w, 3), "uint8")


def _imdecode(data: bytes, flags: int) -> np.ndarray | None:
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None  # some decoders raise instead of returning None on corrupt data


def _slot_array(slot: memoryview, offset: int, shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if offset + nbytes > len(slot):
        raise _invalid(f"image needs {offset + nbytes} bytes of shared memory but a ring slot holds {len(slot)}; "
                       "send a smaller image or ask the operator to raise --slot-mb / max_image_pixels")
    return np.ndarray(shape, dtype=dtype, buffer=slot, offset=offset)
