"""Request validation and image decoding, straight into a ring slot.

Runs on a thread pool (OpenCV releases the GIL while it decodes), so the event
loop keeps serving. Every refusal is a RequestError with the gRPC status a
client should get and a sentence that says what was wrong with its request.
The size announced by an image's header is checked before any pixel is
decoded, so a small file cannot make the server allocate gigabytes.
"""

from __future__ import annotations

import io
import math
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


def _header_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) from the image's header alone; refuses data that is no complete image."""
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            size = im.size
            fmt = im.format
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for garbage
        raise _invalid(f"{what}: not a readable image ({type(exc).__name__}); send JPEG or PNG bytes, "
                       "or set encoding RAW with shape and dtype") from None
    if fmt == "JPEG" and b"\xff\xd9" not in data[-64:]:
        raise _invalid(f"{what}: JPEG data is truncated (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in data[-32:]:
        raise _invalid(f"{what}: PNG data is truncated (no IEND chunk)")
    return size


def _check_pixels(w: int, h: int, max_pixels: int, what: str) -> None:
    if w < 2 or h < 2:
        raise _invalid(f"{what}: {w}x{h} pixels is too small to detect anything in (at least 2x2)")
    if w * h > max_pixels:
        raise _invalid(f"{what}: {w}x{h} = {w * h} pixels exceeds this server's limit of {max_pixels} "
                       "(max_image_pixels); resize the image on the client")


def _raw_array(img: pb.Image, what: str, channels: int | None) -> np.ndarray:
    if img.dtype not in _RAW_DTYPES:
        raise _invalid(f"{what}: RAW images need dtype UINT8, UINT16 or FLOAT32")
    dtype = np.dtype(_RAW_DTYPES[img.dtype])
    shape = tuple(int(s) for s in img.shape)
    if channels == 3:
        if len(shape) != 3 or shape[2] != 3 or dtype != np.uint8:
            raise _invalid(f"{what}: RAW color must be shape [H, W, 3] with dtype UINT8 (RGB), "
                           f"got shape {list(shape)} dtype {pb.DType.Name(img.dtype)}")
    else:
        if len(shape) == 3 and shape[2] == 1:
            shape = shape[:2]
        if len(shape) != 2 or dtype not in (np.uint16, np.float32):
            raise _invalid(f"{what}: RAW depth must be shape [H, W] with dtype UINT16 (mm) or FLOAT32 (m), "
                           f"got shape {list(img.shape)} dtype {pb.DType.Name(img.dtype)}")
    if any(s <= 0 for s in shape):
        raise _invalid(f"{what}: shape {list(shape)} has a non-positive dimension")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(img.data) != expected:
        raise _invalid(f"{what}: RAW data has {len(img.data)} bytes but shape {list(shape)} x "
                       f"{dtype.name} needs {expected}")
    return np.frombuffer(img.data, dtype=dtype).reshape(shape)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def decode_into_slot(request: pb.DetectRequest, needs_depth: bool, slot: memoryview, max_pixels: int) -> Decoded:
    """Decodes color (and depth) into `slot`; color at offset 0 as H x W x 3 RGB, depth after it."""
    color_img = request.color
    if not color_img.data:
        raise _invalid("color.data is empty; send the image bytes (JPEG/PNG) or raw pixels")
    if color_img.encoding == pb.Image.RAW:
        raw = _raw_array(color_img, "color", 3)
        h, w = raw.shape[:2]
        _check_pixels(w, h, max_pixels, "color")
        dst = _slot_array(slot, 0, (h, w, 3), np.uint8)
        np.copyto(dst, raw)
    else:
        w, h = _header_size(color_img.data, "color")
        _check_pixels(w, h, max_pixels, "color")
        bgr = cv2.imdecode(np.frombuffer(color_img.data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise _invalid("color: the image could not be decoded (corrupt or unsupported data)")
        if bgr.shape[:2] != (h, w):
            raise _invalid(f"color: decoded size {bgr.shape[1]}x{bgr.shape[0]} differs from its header's {w}x{h}")
        dst = _slot_array(slot, 0, (h, w, 3), np.uint8)
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=dst)
    color = Placed(0, (h, w, 3), "uint8")
    if not needs_depth:
        return Decoded(color, None, h, w)

    depth_img = request.depth
    if not depth_img.data:
        raise _invalid("this model is RGB-D and needs depth: set DetectRequest.depth "
                       "(a 16-bit PNG in millimetres, or RAW UINT16/FLOAT32)")
    offset = _align(h * w * 3)
    if depth_img.encoding == pb.Image.RAW:
        raw = _raw_array(depth_img, "depth", None)
    else:
        dw, dh = _header_size(depth_img.data, "depth")
        if (dw, dh) != (w, h):
            raise _invalid(f"depth is {dw}x{dh} but color is {w}x{h}; they must be the same size (registered)")
        raw = cv2.imdecode(np.frombuffer(depth_img.data, np.uint8), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise _invalid("depth: the image could not be decoded (corrupt or unsupported data)")
        if raw.ndim != 2 or raw.dtype != np.uint16:
            raise _invalid(f"depth must be a single-channel 16-bit PNG in millimetres; got {raw.dtype} "
                           f"with {1 if raw.ndim == 2 else raw.shape[2]} channel(s)")
    if raw.shape[:2] != (h, w):
        raise _invalid(f"depth is {raw.shape[1]}x{raw.shape[0]} but color is {w}x{h}; they must be the same size")
    if raw.dtype == np.float32 and not np.isfinite(raw).all():
        raise _invalid("depth (FLOAT32, metres) contains NaN or infinity; use 0 for missing pixels")
    dst = _slot_array(slot, offset, raw.shape, raw.dtype)
    np.copyto(dst, raw)
    return Decoded(color, Placed(offset, tuple(raw.shape), raw.dtype.name), h, w)


def _slot_array(slot: memoryview, offset: int, shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > len(slot):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"image needs {offset + nbytes} bytes of shared memory but a ring slot holds {len(slot)}; "
                           "send a smaller image or ask the operator to raise --slot-mb / max_image_pixels")
    return np.ndarray(shape, dtype=dtype, buffer=slot, offset=offset)
