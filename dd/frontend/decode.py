"""Request validation and image decoding, straight into a ring slot.

Runs on a thread pool (OpenCV releases the GIL while it decodes), so the event
loop keeps serving. Every refusal is a ServeError with the status a
client should get and a sentence that says what was wrong with its request;
nothing else may escape (tests/integration/test_bad_input.py fuzzes this with hypothesis).

Everything that is cheap is checked before any pixel is decoded: that depth is
there when the model needs it, RAW lengths, and the sizes announced by both
images' headers (against max_image_pixels, each other and the slot), so a small
file cannot make the server allocate gigabytes or decode an image it will
refuse anyway.

Encoded images must be one of a few formats (JPEG, PNG, BMP, TIFF, WebP), recognised by
their first bytes: the header is then read by Pillow restricted to that format
and decoded by OpenCV, which picks its decoder by the same bytes, so the size
checked is the size decoded, and the exotic decoders OpenCV also carries are
never reached by a request. EXIF orientation is ignored: pixels are used as
stored, which is what the depth image is registered to and what the header says.

ZSTD images are RAW arrays compressed with Zstandard (a 16-bit depth frame decompresses in
about 1.5 ms where its PNG takes 9-12): decompressed straight into the slot, never past
shape x dtype bytes, after the frame's declared content size (when it has one) was checked.

The time a decode takes is bounded before it starts too (dd.frontend.image_cost):
JPEG scans are counted, a PNG reaches the decoder with its pixel chunks only,
TIFF must be uncompressed or use a lossless codec, WebP must be a still image.
An image too elongated for the model (its shorter side would shrink below
MIN_RESIZED_SIDE pixels in the model's resize) is refused before decoding, and
so is a request whose caller has gone (`abandoned`). Once decoding has started,
it ends before this function returns, also when it fails: no decode outlives
its request, so a client cannot keep decoders busy with requests that fail fast.

Where the caller says so (ServerConfig.jpeg_decode), a JPEG color image that the
worker's decoders read as this one does (dd.frontend.jpeg_header) and whose
compressed bytes are fewer than its pixels is checked exactly as above, but its
bytes are copied into the slot instead of its pixels, for the worker to decode
(on its GPU). Its decoded size is the header's, which is what was checked.

A JPEG color image with a restart marker at the start of its MCU rows, and a depth PNG (going as rows)
whose IDAT chunks end in full flushes, which is how the client library writes them, are decoded in
parts on several threads when no other image of their kind decodes in this frontend
(dd.frontend.jpeg_strips, png_depth.inflate_parts_into): the same pixels, bit for bit, in a fraction
of the time.

Where the caller says so (png_rows_to_worker: every ready worker reconstructs PNG rows on its GPU),
a 16-bit grayscale depth PNG is read and inflated here (dd.frontend.png_depth: chunks, CRCs, ISA-L)
straight into the slot, and stays there as its filtered rows if each is None, Sub or Up
(dd.png_rows); one with an Average or Paeth row is decoded by OpenCV as above.
"""

from __future__ import annotations

import io
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import zstandard
from PIL import Image as PILImage

from dd.frontend.errors import ServeError, Status
from dd.frontend.image_cost import CostError, jpeg_scans, png_pixel_chunks
from dd.frontend.inputs import ENCODED, MASKS_NONE, MASKS_RLE, RAW, ZSTD, ImageInput
from dd.frontend.jpeg_header import worker_decodable
from dd.frontend.jpeg_strips import decode_in_strips, restart_layout
from dd.frontend.png_depth import Gray16, PngError, inflate_into, inflate_parts_into
from dd.frontend.png_depth import parse as parse_png
from dd.png_rows import ENCODING as PNG_ROWS
from dd.procutil import name_os_thread

# Decoding must not spawn OpenCV's own thread pool inside each of ours.
cv2.setNumThreads(1)
PILImage.MAX_IMAGE_PIXELS = None  # we apply our own limit, from the config, to the header's size

_ALIGN = 64
MAX_JPEG_SCANS = 32  # ServerConfig.max_jpeg_scans
# The shorter side of an image after the model's resize (MIN_SIZE / MAX_SIZE) must be at least this
# many pixels: one cell of the coarsest feature map a Mask R-CNN pools from (stride 32).
MIN_RESIZED_SIDE = 32
# Depth in metres (RAW FLOAT32) must lie in [0, MAX_DEPTH_M]: what 16-bit millimetres can express.
MAX_DEPTH_M = 65.535
# TIFF codecs whose cost is bounded by the pixels (Pillow's names); JPEG-in-TIFF and the fax codecs are not accepted.
TIFF_COMPRESSIONS = ("raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits")
_RAW_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float32": np.float32}
# Encodings as numbered in the public API, for messages that name an encoding this version does not take.
_ENCODING_NUMBERS = {ENCODED: 0, RAW: 1, ZSTD: 2}
# A zstd frame's window (the memory its decoder allocates) may be at most the array's size,
# rounded up to a power of two: the size a frame that declares its content size (python-zstandard's
# and the zstd command's default) asks for. A frame without one is stopped at shape x dtype bytes.
_ZSTD = threading.local()  # ZstdDecompressors are not thread-safe: each decoding thread has its own
_COLOR_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
_DEPTH_FLAGS = cv2.IMREAD_UNCHANGED  # keeps 16 bits; ignores EXIF orientation
# A request's depth image decodes here while its color image decodes in the caller's thread:
# the request waits for the slower of the two instead of their sum (a noisy 16-bit PNG can
# cost as much as the JPEG). Bounded, like every pool here.
_DEPTH_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="depth-decode",
                                 initializer=name_os_thread)
# Images written to allow it (the client library's: a JPEG with a restart marker at each MCU row, a
# depth PNG whose pixel data is flushed every eighth of its rows) are decoded in up to this many parts
# at once (dd.frontend.jpeg_strips, png_depth.inflate_parts_into) when no other image of their kind
# decodes in this process: a lone request's decode then takes a fraction of its time, and a busy
# frontend, whose cores its other requests take anyway, decodes each whole as before. With a depth
# image decoding beside the color, half the cores each (a 2-core machine then decodes as before).
STRIPS = max(1, min(4, os.cpu_count() or 1))
STRIPS_BESIDE_DEPTH = max(1, min(STRIPS, (os.cpu_count() or 1) // 2))
_MIN_STRIP_ROWS = 6  # MCU rows a JPEG strip has at least
# The parts but each image's first (decoded by the thread that has the image), color's and depth's at once.
_PARTS_THREADS = max(1, 2 * (STRIPS - 1))
_PARTS_POOL = ThreadPoolExecutor(max_workers=_PARTS_THREADS, thread_name_prefix="decode-part",
                                 initializer=name_os_thread)


def set_parts(parts: int) -> None:
    """At most `parts` parts per image (ServerConfig.decode_parts; 1: never split; 0: from the cores,
    as above). Call before serving: the pool grows to fit, it never shrinks."""
    global STRIPS, STRIPS_BESIDE_DEPTH, _PARTS_POOL, _PARTS_THREADS
    if parts <= 0:
        return
    STRIPS = STRIPS_BESIDE_DEPTH = parts
    if _PARTS_THREADS < 2 * (parts - 1):
        _PARTS_THREADS = 2 * (parts - 1)
        _PARTS_POOL = ThreadPoolExecutor(max_workers=_PARTS_THREADS, thread_name_prefix="decode-part",
                                         initializer=name_os_thread)


class _InProgress:
    """How many decodes of one kind (color, depth) run in this process now."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    @contextmanager
    def alone(self) -> Iterator[bool]:
        """Counts this decode while it runs; yields whether it is the only one."""
        with self._lock:
            self.count += 1
            alone = self.count == 1
        try:
            yield alone
        finally:
            with self._lock:
                self.count -= 1


_COLOR, _DEPTH = _InProgress(), _InProgress()


def _invalid(message: str) -> ServeError:
    return ServeError(Status.INVALID_ARGUMENT, message)


@dataclass
class Placed:
    """Where an image now lies in its slot: decoded (`shape`, `dtype`), or compressed (`encoding` "jpeg",
    `nbytes` long, decoding to `shape`, `dtype`), or a depth as its PNG's filtered rows (`encoding`
    "png_rows", `nbytes` = H x (1 + 2W), reconstructing to `shape` uint16: dd.png_rows)."""

    offset: int
    shape: tuple[int, ...]
    dtype: str
    encoding: str = ""
    nbytes: int = 0


@dataclass
class Decoded:
    color: Placed
    depth: Placed | None
    height: int
    width: int


def check_threshold(value: float) -> None:
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise _invalid(f"score_threshold must be in [0, 1] (0: the model's own), got {value}")


def check_mask_format(value: int) -> None:
    if value not in (MASKS_RLE, MASKS_NONE):
        raise _invalid(f"unknown mask_format {value}; use RLE (0) or NONE (1)")


def check_options(score_threshold: float, mask_format: int) -> None:
    """The request's fields other than the images."""
    check_threshold(score_threshold)
    check_mask_format(mask_format)


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


def _inspect(data: bytes, what: str, max_jpeg_scans: int) -> tuple[int, int, bytes]:
    """(width, height, the bytes to decode) from the image's header and structure alone; refuses data
    that is no complete image, or that would cost more to decode than its size allows."""
    fmt = image_format(data)
    if fmt is None:
        raise _invalid(f"{what}: not a JPEG, PNG, BMP, TIFF or WebP image (first bytes {data[:8]!r}); "
                       "send one of those, or set encoding RAW with shape and dtype")
    try:
        with PILImage.open(io.BytesIO(data), formats=[fmt]) as im:
            size = im.size
            compression = im.info.get("compression", "raw") if fmt == "TIFF" else ""
            frames = getattr(im, "n_frames", 1) if fmt == "WEBP" else 1
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for garbage
        raise _invalid(f"{what}: {fmt} data with an unreadable header ({type(exc).__name__}); "
                       "the file is corrupt or truncated") from None
    if fmt == "JPEG" and b"\xff\xd9" not in data[-64:]:
        raise _invalid(f"{what}: JPEG data is truncated (no end-of-image marker at its end)")
    if fmt == "PNG" and b"IEND" not in data[-32:]:
        raise _invalid(f"{what}: PNG data is truncated (no IEND chunk at its end)")
    if fmt == "TIFF" and compression not in TIFF_COMPRESSIONS:
        raise _invalid(f"{what}: TIFF compression {compression!r} is not accepted; use none, LZW, deflate or "
                       "PackBits (or send PNG)")
    if frames != 1:
        raise _invalid(f"{what}: an animated WebP ({frames} frames); send one still image")
    try:
        if fmt == "JPEG":
            jpeg_scans(data, max_jpeg_scans)
        elif fmt == "PNG":
            data = png_pixel_chunks(data)
    except CostError as exc:
        raise _invalid(f"{what}: {exc}") from None
    return size[0], size[1], data


def _check_pixels(w: int, h: int, max_pixels: int, what: str) -> None:
    if w < 2 or h < 2:
        raise _invalid(f"{what}: {w}x{h} pixels is too small to detect anything in (at least 2x2)")
    if w * h > max_pixels:
        raise _invalid(f"{what}: {w}x{h} = {w * h} pixels exceeds this server's limit of {max_pixels} "
                       "(max_image_pixels); resize the image on the client")


def check_aspect(w: int, h: int, resize: tuple[int, int], what: str = "color") -> None:
    """Refuses an image the model's resize would squeeze below MIN_RESIZED_SIDE on its shorter side.

    The model scales an image by min(MIN_SIZE / shorter side, MAX_SIZE / longer side); an image
    far longer than wide (2 x 2000) comes out a pixel or two wide, too thin for any feature map.
    The threshold is MIN_RESIZED_SIDE, or MIN_SIZE where a model resizes to less.
    """
    min_size, max_size = resize
    short, long = min(w, h), max(w, h)
    resized = short * min(min_size / short, max_size / long)
    need = min(MIN_RESIZED_SIDE, min_size)
    if resized < need:
        ratio = max_size / need
        raise _invalid(f"{what}: {w}x{h} is too elongated for this model: its resize (MIN_SIZE {min_size}, "
                       f"MAX_SIZE {max_size}) would leave the shorter side {resized:.2f} pixels, under {need}; "
                       f"the longer side may be at most {ratio:.1f} times the shorter: crop or pad the image")


def _raw_layout(img: ImageInput, what: str, channels: int | None) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a RAW or ZSTD image, checked against what color (channels 3) or depth may be."""
    if img.dtype not in _RAW_DTYPES:
        raise _invalid(f"{what}: RAW and ZSTD images need dtype UINT8, UINT16 or FLOAT32, got {_dtype_name(img.dtype)}")
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
    return shape, dtype


def _raw_array(img: ImageInput, what: str, channels: int | None) -> np.ndarray:
    shape, dtype = _raw_layout(img, what, channels)
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(img.data) != expected:
        raise _invalid(f"{what}: RAW data has {len(img.data)} bytes but shape {list(shape)} x "
                       f"{dtype.name} needs {expected}")
    return np.frombuffer(img.data, dtype=dtype).reshape(shape)


def _dtype_name(value: str) -> str:
    return value.upper()


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _check_encoding(img: ImageInput, what: str) -> None:
    if img.encoding not in (ENCODED, RAW, ZSTD):
        label = _ENCODING_NUMBERS.get(img.encoding, img.encoding)
        raise _invalid(f"{what}: unknown encoding {label}; use ENCODED (0), RAW (1) or ZSTD (2)")


def _zstd_layout(img: ImageInput, what: str, channels: int | None) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ZSTD image, and its frame's declared size checked against them: nothing
    is decompressed for a frame that announces more (or less) than shape x dtype bytes."""
    shape, dtype = _raw_layout(img, what, channels)
    expected = math.prod(shape) * dtype.itemsize
    try:
        declared = zstandard.frame_content_size(img.data)
    except zstandard.ZstdError:
        raise _invalid(f"{what}: ZSTD data is not a Zstandard frame (first bytes {img.data[:8]!r}); compress the "
                       "array's bytes with zstd (python: zstandard.ZstdCompressor().compress(array.tobytes()))") from None
    if declared not in (-1, expected):
        raise _invalid(f"{what}: ZSTD frame holds {declared} bytes but shape {list(shape)} x {dtype.name} "
                       f"needs {expected}")
    return shape, dtype


def _zstd_into(data: bytes, dst: np.ndarray, what: str) -> np.ndarray:
    """Decompresses one frame into `dst` (a view of the slot), which it must fill exactly."""
    out = memoryview(dst).cast("B")
    window_log = max(10, (len(out) - 1).bit_length())  # zstd's smallest window is 1 KiB
    cache = _ZSTD.__dict__.setdefault("by_window_log", {})
    dctx = cache.get(window_log)
    if dctx is None:
        dctx = cache[window_log] = zstandard.ZstdDecompressor(max_window_size=2**window_log)
    filled = 0
    try:
        with dctx.stream_reader(data, read_size=max(len(data), 1), read_across_frames=True) as reader:
            while filled < len(out) and (n := reader.readinto(out[filled:])):
                filled += n
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        if "memory" in str(exc):
            raise _invalid(f"{what}: the ZSTD frame asks for a window larger than its array ({len(out)} bytes; "
                           "a frame may ask for at most the array's size, rounded up to a power of two); compress "
                           "the array in one call, which also records its size") from None
        raise _invalid(f"{what}: ZSTD data could not be decompressed ({exc})") from None
    if filled < len(out):
        raise _invalid(f"{what}: ZSTD data holds {filled} bytes but shape {list(dst.shape)} x {dst.dtype.name} "
                       f"needs {len(out)}; it is truncated or of another shape")
    if extra:
        raise _invalid(f"{what}: ZSTD data holds more than shape {list(dst.shape)} x {dst.dtype.name} = "
                       f"{len(out)} bytes; send one array per image")
    return dst


def _check_abandoned(abandoned: threading.Event | None) -> None:
    if abandoned is not None and abandoned.is_set():
        raise ServeError(Status.CANCELLED, "the call ended before its image was decoded")


def decode_into_slot(color: ImageInput, depth: ImageInput | None, needs_depth: bool, slot: memoryview,
                     max_pixels: int, *, max_jpeg_scans: int = MAX_JPEG_SCANS,
                     resize: tuple[int, int] | None = None, abandoned: threading.Event | None = None,
                     jpeg_to_worker: bool = False, png_rows_to_worker: bool = False) -> Decoded:
    """Decodes color (and depth) into `slot`; color at offset 0 as H x W x 3 RGB, depth after it.

    `depth` None is an empty image (refused when the model needs depth, ignored otherwise).
    `resize`: the model's (MIN_SIZE, MAX_SIZE), for check_aspect. `abandoned`: set by the caller
    when nobody waits for the answer any more; checked before each decode starts. `jpeg_to_worker`:
    a JPEG color the worker can decode goes into the slot compressed (the module's docstring).
    `png_rows_to_worker`: a 16-bit grayscale depth PNG whose rows are all None, Sub or Up goes into the
    slot as its inflated, still filtered rows (dd.frontend.png_depth, dd.png_rows).
    """
    color_img, depth_img = color, depth if depth is not None else ImageInput(b"")
    _check_encoding(color_img, "color")
    if needs_depth:
        _check_encoding(depth_img, "depth")
    if not color_img.data:
        raise _invalid("color.data is empty; send the image bytes (JPEG/PNG) or raw pixels")
    if needs_depth and not depth_img.data:
        raise _invalid("this model is RGB-D and needs depth: set DetectRequest.depth "
                       "(a 16-bit PNG in millimetres, or RAW or ZSTD UINT16/FLOAT32)")

    # 1. Sizes, from RAW shapes or headers; nothing decoded yet.
    color_raw = depth_raw = None
    color_data = depth_data = b""
    depth_png: Gray16 | None = None  # a depth PNG whose rows may go to the worker
    if color_img.encoding == RAW:
        color_raw = _raw_array(color_img, "color", 3)
        h, w = color_raw.shape[:2]
    elif color_img.encoding == ZSTD:
        h, w = _zstd_layout(color_img, "color", 3)[0][:2]
    else:
        w, h, color_data = _inspect(color_img.data, "color", max_jpeg_scans)
    _check_pixels(w, h, max_pixels, "color")
    if resize is not None:
        check_aspect(w, h, resize)
    depth_offset = _align(h * w * 3)
    end = h * w * 3
    if needs_depth:
        if depth_img.encoding == RAW:
            depth_raw = _raw_array(depth_img, "depth", None)
            dh, dw = depth_raw.shape
            itemsize = depth_raw.dtype.itemsize
        elif depth_img.encoding == ZSTD:
            (dh, dw), depth_dtype = _zstd_layout(depth_img, "depth", None)
            itemsize = depth_dtype.itemsize
        else:
            dw, dh, depth_data = _inspect(depth_img.data, "depth", max_jpeg_scans)
            itemsize = 2
            if png_rows_to_worker:
                depth_png = _rows_png(depth_data, depth_offset, len(slot))
        if (dw, dh) != (w, h):
            raise _invalid(f"depth is {dw}x{dh} but color is {w}x{h}; they must be the same size (registered)")
        end = depth_offset + h * w * itemsize
    if end > len(slot):
        raise _invalid(f"image needs {end} bytes of shared memory but a ring slot holds {len(slot)}; "
                       "send a smaller image or ask the operator to raise --slot-mb / max_image_pixels")

    if depth_raw is not None and depth_raw.dtype == np.float32:  # cheap: before any decode
        _check_depth_range(depth_raw)

    # 2. Pixels. The depth decode (into its own array, or a ZSTD depth into the slot) overlaps the
    # color decode, and ends before this function returns or raises: the slot is untouched after.
    _check_abandoned(abandoned)
    depth_future: Future | None = None
    if needs_depth and depth_img.encoding == ZSTD:  # straight into the slot, beside the color decode
        dst = _slot_array(slot, depth_offset, (h, w), depth_dtype)
        depth_future = _DEPTH_POOL.submit(_unless_abandoned, abandoned, _zstd_into, depth_img.data, dst, "depth")
    elif needs_depth and depth_png is not None:  # its rows into the slot; pixels if a row is Average or Paeth
        dst = _slot_array(slot, depth_offset, (depth_png.nbytes,), np.uint8)
        depth_future = _DEPTH_POOL.submit(_unless_abandoned, abandoned, _rows_or_pixels, depth_png, depth_data, dst,
                                          STRIPS_BESIDE_DEPTH)
    elif needs_depth and depth_raw is None:
        depth_future = _DEPTH_POOL.submit(_decode_unless, abandoned, depth_data, _DEPTH_FLAGS)
    try:
        if color_img.encoding == ZSTD:
            color = Placed(0, (h, w, 3), "uint8")
            _zstd_into(color_img.data, _slot_array(slot, 0, (h, w, 3), np.uint8), "color")
        elif jpeg_to_worker and color_raw is None and _send_compressed(color_data, h, w):
            color = _place_compressed(color_data, slot, h, w)
        else:
            color = _decode_color(color_raw, color_data, slot, h, w,
                                  STRIPS if depth_future is None else STRIPS_BESIDE_DEPTH)
    except BaseException:
        if depth_future is not None and not depth_future.cancel():
            # Running: let it end before this request does, so that its cost stays with it
            # (a request whose color fails fast must not leave a depth decode behind).
            wait_futures([depth_future])
        raise
    if not needs_depth:
        return Decoded(color, None, h, w)

    if depth_img.encoding == ZSTD:
        assert depth_future is not None
        depth = depth_future.result()  # already in its place
        if depth.dtype == np.float32:
            _check_depth_range(depth)
        return Decoded(color, Placed(depth_offset, (h, w), depth.dtype.name), h, w)
    if depth_raw is None:
        assert depth_future is not None
        depth_raw = depth_future.result()
        if depth_png is not None and depth_raw is None:  # the rows are in the slot
            return Decoded(color, Placed(depth_offset, (h, w), "uint16", encoding=PNG_ROWS,
                                         nbytes=depth_png.nbytes), h, w)
        if depth_raw is None:
            raise _invalid("depth: the image could not be decoded (corrupt or unsupported data)")
        if depth_raw.ndim != 2 or depth_raw.dtype != np.uint16:
            channels = 1 if depth_raw.ndim == 2 else depth_raw.shape[2]
            raise _invalid(f"depth must be a single-channel 16-bit PNG in millimetres; got {depth_raw.dtype} "
                           f"with {channels} channel(s)")
        if depth_raw.shape != (h, w):
            raise _invalid(f"depth: decoded size {depth_raw.shape[1]}x{depth_raw.shape[0]} differs from its "
                           f"header's {w}x{h}")
    dst = _slot_array(slot, depth_offset, depth_raw.shape, depth_raw.dtype)
    np.copyto(dst, depth_raw)
    return Decoded(color, Placed(depth_offset, tuple(depth_raw.shape), depth_raw.dtype.name), h, w)


def _check_depth_range(depth: np.ndarray) -> None:
    if not np.isfinite(depth).all():
        raise _invalid("depth (FLOAT32, metres) contains NaN or infinity; use 0 for missing pixels")
    lo, hi = float(depth.min()), float(depth.max())
    if lo < 0.0 or hi > MAX_DEPTH_M:
        raise _invalid(f"depth (FLOAT32, metres) must lie in [0, {MAX_DEPTH_M}] (0: missing), got values from "
                       f"{lo:g} to {hi:g}; send metres, not millimetres")


def _rows_png(data: bytes, offset: int, slot_bytes: int) -> Gray16 | None:
    """The depth PNG, if its rows may go to the worker: a 16-bit grayscale PNG read by png_depth whose
    rows fit in the slot after the color. Refuses a broken one (bad CRC, cut short) before any decode."""
    try:
        image = parse_png(data)
    except PngError as exc:
        raise _invalid(f"depth: {exc}") from None
    if image is None or offset + image.nbytes > slot_bytes:
        return None
    return image


def _rows_or_pixels(image: Gray16, data: bytes, dst: np.ndarray, max_parts: int = 1) -> np.ndarray | None:
    """Inflates the depth PNG's rows into `dst` (the slot) and returns None when they may go as they are
    (each None, Sub or Up); otherwise its pixels, decoded by OpenCV as without rows (they are copied over
    the rows). INVALID_ARGUMENT for a broken stream. Its stream in up to `max_parts` parts at once where
    it has flush points and no other depth decodes in this process."""
    with _DEPTH.alone() as alone:
        try:
            parts = max_parts if alone and image.flush_points else 1
            rows = inflate_parts_into(image, dst, parts, _PARTS_POOL) if parts > 1 else inflate_into(image, dst)
            if rows is not None:
                return None
        except PngError as exc:
            raise _invalid(f"depth: {exc}") from None
        return _imdecode(data, _DEPTH_FLAGS)


def _decode_color(color_raw: np.ndarray | None, data: bytes, slot: memoryview, h: int, w: int,
                  max_strips: int = 1) -> Placed:
    dst = _slot_array(slot, 0, (h, w, 3), np.uint8)
    if color_raw is not None:
        np.copyto(dst, color_raw)
        return Placed(0, (h, w, 3), "uint8")
    with _COLOR.alone() as alone:  # every color decode counted: a JPEG beside another one is decoded whole
        if not (alone and _decoded_in_strips(data, dst, max_strips)):
            bgr = _imdecode(data, _COLOR_FLAGS)
            if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
                raise _invalid("color: the image could not be decoded (corrupt or unsupported data)")
            if bgr.shape[:2] != (h, w):
                raise _invalid(f"color: decoded size {bgr.shape[1]}x{bgr.shape[0]} differs from its header's "
                               f"{w}x{h}")
            cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=dst)
    return Placed(0, (h, w, 3), "uint8")


def _decoded_in_strips(data: bytes, dst: np.ndarray, max_strips: int) -> bool:
    """Decodes a JPEG with restart markers at its MCU rows in up to `max_strips` strips on as many
    threads; False (nothing decoded, or rows to be overwritten) where it cannot."""
    if max_strips < 2 or data[:2] != b"\xff\xd8":
        return False
    layout = restart_layout(data)
    if layout is None or (layout.height, layout.width) != dst.shape[:2]:
        return False
    strips = min(max_strips, layout.mcu_rows // _MIN_STRIP_ROWS)
    return strips >= 2 and decode_in_strips(data, layout, dst, strips, _PARTS_POOL)


def _send_compressed(data: bytes, h: int, w: int) -> bool:
    """A JPEG the worker decodes as this frontend would, and smaller than its pixels: the slot's layout
    (depth after H x W x 3 bytes) and its size check hold as they are."""
    return image_format(data) == "JPEG" and len(data) <= h * w * 3 and worker_decodable(data)


def _place_compressed(data: bytes, slot: memoryview, h: int, w: int) -> Placed:
    slot[:len(data)] = data
    return Placed(0, (h, w, 3), "uint8", encoding="jpeg", nbytes=len(data))


def _decode_unless(abandoned: threading.Event | None, data: bytes, flags: int) -> np.ndarray | None:
    """A depth decode that does not start for a request that is gone (its color decode failed, or
    its caller left) while it waited for a thread."""
    _check_abandoned(abandoned)
    with _DEPTH.alone():  # counted, so that a depth PNG beside it is inflated whole
        return _imdecode(data, flags)


def _unless_abandoned(abandoned: threading.Event | None, fn, *args):  # noqa: ANN001, ANN202
    _check_abandoned(abandoned)
    return fn(*args)


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


def warm_up() -> None:
    """Runs the decode path once on tiny images (JPEG color, 16-bit PNG depth, as pixels and as rows)
    before the process serves. Pillow imports its format plugins at its first Image.open (9-10 ms
    here), the depth pool starts its first thread, and OpenCV, ISA-L and zstandard make their first
    calls: without this, each frontend's first request paid them (run S9-4 on the H200: the server's
    total for the first requests 61-69 ms against a p50 of 17-38 ms)."""
    color = np.zeros((16, 16, 3), np.uint8)
    color[4:12, 4:12] = 200
    depth = np.full((16, 16), 1000, np.uint16)
    ok_jpg, jpg = cv2.imencode(".jpg", color)
    ok_png, png = cv2.imencode(".png", depth)
    if not (ok_jpg and ok_png):
        raise RuntimeError("OpenCV cannot encode the warm-up images; is its build complete?")
    slot = memoryview(bytearray(16 * 16 * 8 + 4096))
    for rows in (False, True):
        decode_into_slot(ImageInput(jpg.tobytes()), ImageInput(png.tobytes()), True, slot, 16 * 16,
                         png_rows_to_worker=rows)
    zst = zstandard.ZstdCompressor().compress(depth.tobytes())
    decode_into_slot(ImageInput(jpg.tobytes()), ImageInput(zst, ZSTD, (16, 16), "uint16"), True, slot, 16 * 16)
    # Restart markers at each MCU row, tall enough for strips: the strip path's first calls.
    tall = np.zeros((16 * STRIPS * _MIN_STRIP_ROWS, 16, 3), np.uint8)
    ok, jpg = cv2.imencode(".jpg", tall, [cv2.IMWRITE_JPEG_RST_INTERVAL, 1])
    if ok:
        _decoded_in_strips(jpg.tobytes(), np.empty(tall.shape, np.uint8), STRIPS)
    # Every thread of the parts' pool started (a pool starts one per task until it has them all).
    started = threading.Barrier(_PARTS_THREADS + 1)
    for _ in range(_PARTS_THREADS):
        _PARTS_POOL.submit(started.wait, 10.0)
    started.wait(10.0)
