"""How the client puts images on the wire, chosen per link.

What an image costs is paid twice: by the client that encodes it and by the server that decodes it,
and the link carries what is left. Measured on dd.synth 1280x720 depth frames
(scripts/bench_depth_encodings.py, one core; BENCHMARKS.md): 16-bit PNG 796 KiB, 16 ms to encode
with OpenCV (5 ms as written here), 9 ms to decode; zstd level 1 749 KiB, 6 ms to encode, 1.6 ms to
decode (level 3: 692 KiB, 11 ms and 2 ms). So:

- `raw`: arrays as they are (files are decoded by the client first). Nothing is encoded or decoded
  on either side; 4.6 MB per 1280x720 RGB-D frame, which a local link moves for less than any codec
  costs. What `auto` picks for a local server (a loopback address or a unix socket).
- `jpeg+zstd`: color arrays as JPEG (quality 95, a restart marker at each MCU row, so that the
  server decodes it on several cores at once), depth as zstd level 1 (smaller than its PNG and
  six times cheaper to decode). What `auto` picks for any other server. Encoded color files are sent
  as they are (never re-encoded); a depth file is decoded and recompressed (lossless).
- `jpeg+png`: color arrays as JPEG, depth arrays as 16-bit PNG (written here: Sub rows in 8 runs
  compressed apart, which the server inflates on several cores at once); files as they are. For servers that
  predate ZSTD (float32 depth, which PNG cannot hold, goes raw).
- `as-is`: arrays raw, files and bytes as they are (the server decodes them): what
  `make_request` does unless told otherwise.
"""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path
from typing import Union

import numpy as np

from dd.proto.deep_detection.v1 import detector_pb2 as pb

ImageLike = Union[str, Path, bytes, bytearray, memoryview, np.ndarray]

ENCODINGS = ("auto", "raw", "jpeg+zstd", "jpeg+png", "as-is")
JPEG_QUALITY = 95
ZSTD_LEVEL = 1
_DTYPES = {np.dtype(np.uint8): pb.UINT8, np.dtype(np.uint16): pb.UINT16, np.dtype(np.float32): pb.FLOAT32}
_LOCAL_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def is_local(target: str) -> bool:
    """Whether a gRPC target names this host: a unix socket, or a loopback name or address.

    Accepts gRPC's forms: `host:port`, `[::1]:port`, `unix:PATH`, `unix-abstract:NAME`,
    `ipv4:ADDR:PORT`, `ipv6:[ADDR]:PORT`, `dns:[//AUTHORITY/]host:port`.
    """
    t = target.strip()
    scheme, _, rest = t.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme in ("dns", "ipv4", "ipv6"):
        t = rest.split("/")[-1] if rest.startswith("//") else rest
        t = t.split(",")[0]  # ipv4:a:p,b:p lists addresses; the first decides
    if t.startswith("["):
        host = t[1:t.find("]")] if "]" in t else t[1:]
    elif t.count(":") == 1:
        host = t.split(":")[0]
    else:
        host = t  # a bare host, or an IPv6 address without a port
    host = host.lower()
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(encoding: str, target: str) -> str:
    """The concrete encoding `encoding` stands for when talking to `target` (`auto` -> per link)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if encoding != "auto":
        return encoding
    return "raw" if is_local(target) else "jpeg+zstd"


def _raw(arr: np.ndarray) -> pb.Image:
    arr = np.ascontiguousarray(arr)
    return pb.Image(data=arr.tobytes(), encoding=pb.Image.RAW, shape=list(arr.shape), dtype=_DTYPES[arr.dtype])


def _zstd(arr: np.ndarray) -> pb.Image:
    import zstandard

    arr = np.ascontiguousarray(arr)
    data = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(arr.data)
    return pb.Image(data=data, encoding=pb.Image.ZSTD, shape=list(arr.shape), dtype=_DTYPES[arr.dtype])


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """An RGB array as a baseline JPEG (4:2:0) with a restart marker at the start of every MCU row
    (16 pixel rows): any decoder reads it as usual, and the server decodes it in strips on several cores
    at once (dd/frontend/jpeg_strips.py), to the same pixels. About 5 bytes a row (0.1% of a 1280x720
    frame), and a whole decode about 5% slower (libjpeg-turbo leaves its fast path near each marker)."""
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
              cv2.IMWRITE_JPEG_RST_INTERVAL, -(-rgb.shape[1] // 16)]  # MCUs a row: 16 pixels wide at 4:2:0
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"cannot encode a {rgb.shape} array as JPEG")
    return buf.tobytes()


def _jpeg(rgb: np.ndarray) -> pb.Image:
    return pb.Image(data=encode_jpeg(rgb), encoding=pb.Image.ENCODED)


def _png(depth: np.ndarray) -> pb.Image:
    if depth.ndim == 2 and depth.dtype == np.uint16 and depth.size:
        return pb.Image(data=encode_png16(depth), encoding=pb.Image.ENCODED)
    import cv2

    ok, buf = cv2.imencode(".png", depth)
    if not ok:
        raise ValueError(f"cannot encode a {depth.shape} {depth.dtype} array as PNG")
    return pb.Image(data=buf.tobytes(), encoding=pb.Image.ENCODED)


PNG_SEGMENTS = 8  # independently inflatable parts of a depth PNG's pixel data


def encode_png16(depth: np.ndarray, segments: int = PNG_SEGMENTS) -> bytes:
    """A 16-bit grayscale PNG of an H x W uint16 array that the server inflates on several cores at once.

    Every row is filtered with Sub (the server's GPU workers rebuild such rows themselves:
    dd/png_rows.py) and the rows are compressed by ISA-L in `segments` runs of rows, each a deflate
    stream of its own ended by a full flush and stored in an IDAT chunk of its own: no run refers to
    another, so the frontend inflates them in parallel (dd/frontend/png_depth.py), while any PNG
    decoder reads one ordinary zlib stream. Written here rather than by OpenCV (libpng), which can do
    neither; on 1280x720 dd.synth frames, one core: 791 KiB in 5.3 ms, against OpenCV's 796 KiB in
    16.5 ms (scripts/bench_depth_encodings.py, BENCHMARKS.md session 10)."""
    from isal import isal_zlib

    h, w = depth.shape
    be = np.ascontiguousarray(depth, dtype=">u2").view(np.uint8).reshape(h, 2 * w)
    rows = np.empty((h, 1 + 2 * w), np.uint8)
    rows[:, 0] = 1  # Sub: each byte minus the byte one pixel (2 bytes) to its left, modulo 256
    rows[:, 1:3] = be[:, :2]
    np.subtract(be[:, 2:], be[:, :-2], out=rows[:, 3:])
    step = -(-h // max(1, min(segments, h)))
    zdata = [b"\x78\x01"]  # zlib header: deflate, 32 KiB window, fastest
    for top in range(0, h, step):
        compressor = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -15)
        part = compressor.compress(rows[top:top + step].data)
        last = top + step >= h
        zdata.append(part + compressor.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_FULL_FLUSH))
    zdata[-1] += struct.pack(">I", isal_zlib.adler32(rows.data))  # the zlib trailer, after the last run
    zdata[1] = zdata[0] + zdata[1]  # and its header before the first
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    return b"".join([b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", ihdr), *(_chunk(b"IDAT", z) for z in zdata[1:]),
                     _chunk(b"IEND", b"")])


def _chunk(kind: bytes, body: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _decoded(data: bytes, depth: bool) -> np.ndarray | None:
    """The array a file's bytes hold, as the server would decode them (color RGB, depth as stored);
    None where it is no image the server accepts as such: then the bytes go as they are, and the
    server says what is wrong with them."""
    import cv2

    flags = cv2.IMREAD_UNCHANGED if depth else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None
    if arr is None:
        return None
    if depth:
        return arr if arr.ndim == 2 and arr.dtype in (np.uint16, np.float32) else None
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB) if arr.ndim == 3 and arr.shape[2] == 3 else None


def to_image(value: ImageLike, encoding: str = "as-is", *, depth: bool = False) -> pb.Image:
    """One image for the wire, in `encoding` (a concrete one: `resolve` first). Arrays are RGB
    (color) or H x W uint16 mm / float32 m (depth); paths and bytes hold an encoded file."""
    if encoding == "auto":
        raise ValueError("resolve 'auto' against the server's address first (dd.client.encoding.resolve)")
    if isinstance(value, (str, Path)):
        value = Path(value).read_bytes()
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if encoding == "raw" or (encoding == "jpeg+zstd" and depth):
            arr = _decoded(data, depth)
            if arr is not None:
                return _raw(arr) if encoding == "raw" else _zstd(arr)
        return pb.Image(data=data, encoding=pb.Image.ENCODED)
    if not isinstance(value, np.ndarray):
        raise TypeError(f"cannot send {type(value).__name__} as an image; give a path, bytes or a numpy array")
    if value.dtype not in _DTYPES:
        raise ValueError(f"raw images must be uint8, uint16 or float32, not {value.dtype}")
    if encoding in ("raw", "as-is"):
        return _raw(value)
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if not depth:
        return _jpeg(value) if value.ndim == 3 and value.shape[2] == 3 and value.dtype == np.uint8 else _raw(value)
    if encoding == "jpeg+zstd":
        return _zstd(value)
    return _png(value) if value.dtype == np.uint16 else _raw(value)


def old_server_hint(details: str, request: pb.DetectRequest) -> str | None:
    """What to tell a user whose ZSTD image a server refused because it does not know the encoding."""
    used = request.color.encoding == pb.Image.ZSTD or (request.HasField("depth")
                                                       and request.depth.encoding == pb.Image.ZSTD)
    if not used or "unknown encoding 2" not in details:
        return None
    return (f"{details} -- this server predates ZSTD images: upgrade the server, or send PNG depth "
            "(encoding='jpeg+png', or --encoding jpeg+png on the command line)")
