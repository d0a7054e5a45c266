"""Bad input, each refused with a specific status and a message that says what is wrong, while the server
keeps serving everyone else; and a property-based fuzz of validation and decoding."""

from __future__ import annotations

from pathlib import Path

import io
import struct
import time
import zlib

import cv2
import grpc
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from dd.frontend.decode import decode_into_slot
from dd.frontend.errors import ServeError, Status
from dd.frontend.protocols.detector_v1 import check_options, image_inputs
from dd.png_rows import unfilter
from dd.proto.deep_detection.v1 import detector_pb2 as pb
from tests.faults import Server, answer_problem, detect, null_case, null_model
from tests.png_writer import png16

MAX_PIXELS = 500_000
MAX_MESSAGE_MB = 2


def encode(ext: str, arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, arr)
    assert ok
    return buf.tobytes()


def png_with_size(w: int, h: int) -> bytes:
    """A well-formed PNG whose header announces w x h pixels, with (almost) no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_with_size(w: int, h: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to announce w x h pixels."""
    data = bytearray(encode(".jpg", np.full((16, 16, 3), 128, np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def exif_rotated_jpeg(h: int, w: int) -> bytes:
    """A JPEG with EXIF orientation 6 (rotate 90 degrees), as phones write them."""
    im = PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    out = io.BytesIO()
    im.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


H, W = 24, 32
COLOR = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
DEPTH = np.random.default_rng(2).integers(1, 4000, (H, W), dtype=np.uint16)
GOOD_JPEG = encode(".jpg", COLOR)
GOOD_PNG = encode(".png", COLOR)
DEPTH_PNG = encode(".png", DEPTH)


def img(data: bytes) -> pb.Image:
    return pb.Image(data=data, encoding=pb.Image.ENCODED)


def raw(arr: np.ndarray, dtype: int | None = None, shape: list[int] | None = None, data: bytes | None = None) -> pb.Image:
    dt = {np.dtype(np.uint8): pb.UINT8, np.dtype(np.uint16): pb.UINT16, np.dtype(np.float32): pb.FLOAT32}
    return pb.Image(data=arr.tobytes() if data is None else data, encoding=pb.Image.RAW,
                    shape=list(arr.shape) if shape is None else shape, dtype=dt[arr.dtype] if dtype is None else dtype)


def zstd(arr: np.ndarray, data: bytes | None = None) -> pb.Image:
    image = raw(arr, data=zstandard.ZstdCompressor().compress(arr.tobytes()) if data is None else data)
    image.encoding = pb.Image.ZSTD
    return image


def rgbd(color: pb.Image, depth: pb.Image | None = None, **kw) -> pb.DetectRequest:
    req = pb.DetectRequest(model="rgbd", color=color, **kw)
    if depth is not None:
        req.depth.CopyFrom(depth)
    return req


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_REQUESTS = {
    "truncated-jpeg": (rgbd(img(GOOD_JPEG[:len(GOOD_JPEG) // 2]), img(DEPTH_PNG)), INVALID, "truncated"),
    "truncated-png": (rgbd(img(GOOD_PNG[:len(GOOD_PNG) - 20]), img(DEPTH_PNG)), INVALID, "truncated"),
    "random-bytes": (rgbd(img(np.random.default_rng(3).bytes(5000)), img(DEPTH_PNG)), INVALID,
                     "not a JPEG, PNG, BMP, TIFF or WebP image"),
    "png-signature-then-garbage": (rgbd(img(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), img(DEPTH_PNG)), INVALID,
                                   "PNG data with an unreadable header"),
    "gif-not-accepted": (rgbd(img(b"GIF89a" + bytes(100)), img(DEPTH_PNG)), INVALID, "not a JPEG, PNG"),
    "empty-color": (rgbd(img(b""), img(DEPTH_PNG)), INVALID, "color.data is empty"),
    "1x1-png": (rgbd(img(encode(".png", np.zeros((1, 1, 3), np.uint8))), img(DEPTH_PNG)), INVALID,
                "1x1 pixels is too small"),
    "30000x30000-png-header": (rgbd(img(png_with_size(30000, 30000)), img(DEPTH_PNG)), INVALID,
                               "30000x30000 = 900000000 pixels exceeds this server's limit"),
    "30000x30000-jpeg-header": (rgbd(img(jpeg_with_size(30000, 30000)), img(DEPTH_PNG)), INVALID,
                                "30000x30000 = 900000000 pixels exceeds"),
    "raw-over-max-pixels": (pb.DetectRequest(model="rgb", color=raw(np.zeros((800, 700, 3), np.uint8))),
                            INVALID, "700x800 = 560000 pixels exceeds this server's limit of 500000"),
    "depth-size-differs": (rgbd(img(GOOD_PNG), img(encode(".png", DEPTH[:10, :20]))), INVALID,
                           "depth is 20x10 but color is 32x24"),
    "raw-depth-size-differs": (rgbd(raw(COLOR), raw(DEPTH[:, :30].copy())), INVALID, "depth is 30x24 but color is 32x24"),
    "depth-8-bit-png": (rgbd(img(GOOD_PNG), img(encode(".png", (DEPTH // 16).astype(np.uint8)))), INVALID,
                        "single-channel 16-bit PNG"),
    "depth-3-channel-png": (rgbd(img(GOOD_PNG), img(encode(".png", np.dstack([DEPTH] * 3)))), INVALID,
                            "with 3 channel(s)"),
    "depth-jpeg": (rgbd(img(GOOD_PNG), img(encode(".jpg", (DEPTH // 16).astype(np.uint8)))), INVALID, "16-bit"),
    "raw-depth-uint8": (rgbd(raw(COLOR), raw((DEPTH // 16).astype(np.uint8))), INVALID,
                        "RAW depth must be shape [H, W] with dtype UINT16"),
    "raw-depth-nan": (rgbd(raw(COLOR), raw(np.full((H, W), np.nan, np.float32))), INVALID, "NaN or infinity"),
    "raw-length-mismatch": (rgbd(raw(COLOR, data=COLOR.tobytes()[:-7]), raw(DEPTH)), INVALID,
                            "RAW data has 2297 bytes but shape [24, 32, 3] x uint8 needs 2304"),
    "raw-color-4-channels": (rgbd(raw(np.zeros((H, W, 4), np.uint8)), raw(DEPTH)), INVALID,
                             "RAW color must be shape [H, W, 3]"),
    "raw-no-dtype": (rgbd(raw(COLOR, dtype=pb.DTYPE_UNSPECIFIED), raw(DEPTH)), INVALID, "need dtype"),
    "raw-negative-shape": (rgbd(raw(COLOR, shape=[-24, -32, 3]), raw(DEPTH)), INVALID, "non-positive dimension"),
    "unknown-model": (pb.DetectRequest(model="nope", color=img(GOOD_PNG)), grpc.StatusCode.NOT_FOUND,
                      "model 'nope' is not served here; served: rgb, rgbd"),
    "rgbd-without-depth": (rgbd(img(GOOD_PNG)), INVALID, "this model is RGB-D and needs depth"),
    "nan-threshold": (rgbd(img(GOOD_PNG), img(DEPTH_PNG), score_threshold=float("nan")), INVALID,
                      "score_threshold must be in [0, 1]"),
    "threshold-above-1": (rgbd(img(GOOD_PNG), img(DEPTH_PNG), score_threshold=1.5), INVALID, "got 1.5"),
    "negative-threshold": (rgbd(img(GOOD_PNG), img(DEPTH_PNG), score_threshold=-0.25), INVALID, "got -0.25"),
    "unknown-mask-format": (rgbd(img(GOOD_PNG), img(DEPTH_PNG), mask_format=7), INVALID, "unknown mask_format 7"),
    "unknown-encoding": (rgbd(pb.Image(data=GOOD_PNG, encoding=5), img(DEPTH_PNG)), INVALID,
                         "color: unknown encoding 5; use ENCODED (0), RAW (1) or ZSTD (2)"),
    "unknown-depth-encoding": (rgbd(img(GOOD_PNG), pb.Image(data=DEPTH_PNG, encoding=9)), INVALID,
                               "depth: unknown encoding 9"),
    "raw-depth-negative": (rgbd(raw(COLOR), raw(np.full((H, W), -1.0, np.float32))), INVALID,
                           "must lie in [0, 65.535] (0: missing), got values from -1 to -1"),
    "raw-depth-1e30": (rgbd(raw(COLOR), raw(np.full((H, W), 1e30, np.float32))), INVALID,
                       "must lie in [0, 65.535]"),
    "zstd-bomb": (rgbd(raw(COLOR), zstd(DEPTH, zstandard.ZstdCompressor().compress(bytes(64 << 20)))), INVALID,
                  "depth: ZSTD frame holds 67108864 bytes but shape [24, 32] x uint16 needs 1536"),
    "zstd-bomb-without-size": (rgbd(zstd(COLOR, zstandard.ZstdCompressor(compression_params=zstandard.
        ZstdCompressionParameters(window_log=10, write_content_size=False)).compress(bytes(64 << 20))), raw(DEPTH)),
        INVALID, "color: ZSTD data holds more than shape [24, 32, 3] x uint8 = 2304 bytes"),
    "zstd-bomb-large-window": (rgbd(zstd(COLOR, zstandard.ZstdCompressor(write_content_size=False).compress(
        bytes(64 << 20))), raw(DEPTH)), INVALID, "color: the ZSTD frame asks for a window larger than its array"),
    "zstd-garbage": (rgbd(raw(COLOR), zstd(DEPTH, DEPTH.tobytes())), INVALID, "depth: ZSTD data is not a Zstandard frame"),
    "zstd-depth-uint8": (rgbd(raw(COLOR), zstd((DEPTH // 16).astype(np.uint8))), INVALID,
                         "RAW depth must be shape [H, W] with dtype UINT16"),
    "over-message-limit": (rgbd(raw(np.zeros((1000, 1000, 3), np.uint8))), grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "larger than max"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bad-input")
    null_model(root / "rgbd", kind="rgbd")
    null_model(root / "rgb", kind="rgb")
    srv = Server(root, args=["--max-image-pixels", str(MAX_PIXELS), "--max-message-mb", str(MAX_MESSAGE_MB)],
                 slot_mb=4).start()
    try:
        srv.wait_serving(120)
        yield srv
    finally:
        srv.stop()


def assert_serves(srv: Server, i: int) -> None:
    case = null_case(i, model="rgbd")
    assert answer_problem(case, detect(srv.target, case.request)) is None


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_refused_with_a_reason(server: Server, name: str) -> None:
    request, code, message = BAD_REQUESTS[name]
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        detect(server.target, request)
    assert err.value.code() == code, (err.value.code(), err.value.details())
    assert message in err.value.details(), err.value.details()
    assert time.monotonic() - t0 < 10, "refusals are cheap: nothing big is decoded"
    assert_serves(server, hash(name) % 1000)


def test_server_survived_every_bad_request(server: Server) -> None:
    """Run last in this module: no process restarted, no slot leaked."""
    assert "exited with" not in server.log(), server.log()
    assert server.slots_in_use() == 0
    assert_serves(server, 7)


def test_exif_orientation_is_ignored(server: Server) -> None:
    """Regression: a JPEG with EXIF orientation was decoded rotated by OpenCV and then refused because its
    size no longer matched its header. Pixels are used as stored (what depth is registered to)."""
    resp = detect(server.target, pb.DetectRequest(model="rgb", color=img(exif_rotated_jpeg(40, 60))))
    assert (resp.width, resp.height) == (60, 40)


def test_client_pictures_read_color_as_the_server_does(tmp_path: Path) -> None:
    """The client draws the server's masks over its own decode of the file: both must ignore EXIF
    orientation, or a phone's JPEG gets masks drawn on a rotated picture."""
    from dd.client.viz import read_color

    path = tmp_path / "phone.jpg"
    path.write_bytes(exif_rotated_jpeg(40, 60))
    assert read_color(path).shape == (40, 60, 3)


def test_accepted_formats_are_served(server: Server) -> None:
    for ext in (".jpg", ".png", ".bmp", ".tiff", ".webp"):
        resp = detect(server.target, rgbd(img(encode(ext, COLOR)), img(DEPTH_PNG)))
        assert (resp.width, resp.height) == (W, H), ext
    resp = detect(server.target, rgbd(img(GOOD_PNG), img(encode(".tiff", DEPTH))))  # 16-bit TIFF depth
    assert resp.height == H


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_on_the_wire(server: Server, payload: bytes) -> None:
    """Whatever the bytes of the message, the answer is a status, never a crash."""
    with grpc.insecure_channel(server.target) as ch:
        call = ch.unary_unary("/deep_detection.v1.Detector/Detect", request_serializer=None,
                              response_deserializer=None)
        try:
            call(payload, timeout=30)
        except grpc.RpcError as exc:
            # Regression: a message that is no valid protobuf was answered UNKNOWN ("Unexpected DecodeError").
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
                (exc.code(), exc.details())
            assert exc.details()


# -- in-process fuzz of validation and decoding ---------------------------------------------------
_rng = np.random.default_rng(0)
_SEEDS = [encode(".png", _rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)),
          encode(".jpg", _rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)),
          encode(".png", _rng.integers(0, 5000, (9, 7), dtype=np.uint16)),
          png16(_rng.integers(0, 65535, (9, 7), dtype=np.uint16), [0, 1, 2, 2, 1, 0, 2, 1, 2]),  # rows may go as rows
          encode(".png", _rng.integers(0, 255, (9, 7), dtype=np.uint8)),
          encode(".bmp", _rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)),
          encode(".tiff", _rng.integers(0, 5000, (9, 7), dtype=np.uint16)),
          encode(".webp", _rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)),
          png_with_size(30000, 30000), jpeg_with_size(5, 5000),
          encode(".jpg", np.full((40, 40, 3), 90, np.uint8))]  # fewer bytes than pixels: may go compressed


@st.composite
def images(draw: st.DrawFn) -> pb.Image:
    kind = draw(st.sampled_from(["mutated", "raw", "bytes"]))
    if kind == "mutated":
        data = bytearray(draw(st.sampled_from(_SEEDS)))
        for _ in range(draw(st.integers(0, 4))):
            op = draw(st.integers(0, 2))
            if op == 0 and data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            elif op == 1:
                data = data[:draw(st.integers(0, len(data)))]
            else:
                data += draw(st.binary(max_size=16))
        return pb.Image(data=bytes(data), encoding=draw(st.sampled_from([0, 0, 0, 5])))
    if kind == "raw":
        shape = draw(st.lists(st.integers(-2, 12), max_size=4))
        n = draw(st.one_of(st.just(abs(int(np.prod(shape or [0]))) * draw(st.sampled_from([1, 2, 4]))),
                           st.integers(0, 700)))
        return pb.Image(data=draw(st.binary(min_size=n, max_size=n)), encoding=pb.Image.RAW, shape=shape,
                        dtype=draw(st.sampled_from([0, 1, 2, 3, 9])))
    return pb.Image(data=draw(st.binary(max_size=64)))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(color=images(), depth=images(), needs_depth=st.booleans(), slot_size=st.sampled_from([256, 4096, 1 << 16]),
       threshold=st.floats(allow_nan=True, allow_infinity=True, width=32), mask_format=st.integers(-2, 3),
       jpeg_to_worker=st.booleans(), png_rows_to_worker=st.booleans())
def test_fuzz_validation_and_decoding(color: pb.Image, depth: pb.Image, needs_depth: bool, slot_size: int,
                                      threshold: float, mask_format: int, jpeg_to_worker: bool,
                                      png_rows_to_worker: bool) -> None:
    """decode_into_slot and check_options only ever succeed or raise ServeError; on success what they
    wrote fits the slot and the limits, RAW pixels arrive unchanged, a JPEG sent on compressed
    (jpeg_to_worker) arrives as its bytes, no more than its pixels would take, and a depth sent as PNG rows
    (png_rows_to_worker) reconstructs to what OpenCV decodes."""
    req = pb.DetectRequest(color=color, depth=depth, score_threshold=threshold, mask_format=mask_format)
    try:
        check_options(req)
        assert 0.0 <= req.score_threshold <= 1.0 and req.mask_format in (pb.RLE, pb.NONE)
    except ServeError as exc:
        assert exc.status == Status.INVALID_ARGUMENT and exc.message
    slot = memoryview(bytearray(slot_size))
    try:
        out = decode_into_slot(*image_inputs(req), needs_depth, slot, max_pixels=2000, jpeg_to_worker=jpeg_to_worker,
                               png_rows_to_worker=png_rows_to_worker)
    except ServeError as exc:
        assert exc.status == Status.INVALID_ARGUMENT and exc.message
        return
    assert 2 <= out.height and 2 <= out.width and out.height * out.width <= 2000
    assert out.color.shape == (out.height, out.width, 3)
    assert (out.depth is not None) == needs_depth
    if out.depth is not None:
        assert out.depth.shape == (out.height, out.width) and out.depth.dtype in ("uint16", "float32")
        end = out.depth.offset + out.height * out.width * np.dtype(out.depth.dtype).itemsize
        assert out.depth.offset >= out.height * out.width * 3 and end <= slot_size
        assert out.depth.encoding in ("", "png_rows") and (out.depth.encoding == "png_rows") <= png_rows_to_worker
    if out.depth is not None and out.depth.encoding == "png_rows":
        h, w = out.height, out.width
        assert out.depth.nbytes == h * (1 + 2 * w) and out.depth.offset + out.depth.nbytes <= slot_size
        rows = np.frombuffer(slot, np.uint8, out.depth.nbytes, out.depth.offset).reshape(h, 1 + 2 * w)
        expected = cv2.imdecode(np.frombuffer(depth.data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert expected is not None and np.array_equal(unfilter(rows, h, w), expected)
    if color.encoding == pb.Image.RAW:
        placed = np.frombuffer(slot, np.uint8, out.height * out.width * 3).reshape(out.height, out.width, 3)
        assert placed.tobytes() == color.data
    assert out.color.encoding in ("", "jpeg") and (out.color.encoding == "jpeg") <= jpeg_to_worker
    if out.color.encoding == "jpeg":
        assert out.color.nbytes == len(color.data) <= out.height * out.width * 3
        assert bytes(slot[:out.color.nbytes]) == color.data
