"""A test-only PNG writer for 16-bit grayscale images that filters each row as told, for the PNG-rows tests.

Written from the PNG specification (ISO/IEC 15948, section 9: filter method 0, byte-wise on the
big-endian samples, bpp = 2), independently of any library's encoder, so that the tests can
produce rows of every filter type in any mix (libpng picks its own) and hand them to OpenCV's
decoder as the reference. zlib compresses the rows; chunks carry their CRCs.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

NONE, SUB, UP, AVERAGE, PAETH = range(5)
BPP = 2  # bytes per pixel: one 16-bit sample


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk: length, type, data, CRC (of type and data; `crc` overrides it, for bad files)."""
    value = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", value & 0xFFFFFFFF)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    a, b, c = a.astype(np.int32), b.astype(np.int32), c.astype(np.int32)
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filter_row(kind: int, raw: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The filtered bytes of one row (raw and prior: its bytes and the row above's, uint8)."""
    raw_i = raw.astype(np.int32)
    left = np.concatenate([np.zeros(BPP, np.int32), raw_i[:-BPP]])
    up = prior.astype(np.int32)
    up_left = np.concatenate([np.zeros(BPP, np.int32), up[:-BPP]])
    if kind == NONE:
        pred = np.zeros_like(raw_i)
    elif kind == SUB:
        pred = left
    elif kind == UP:
        pred = up
    elif kind == AVERAGE:
        pred = (left + up) // 2
    elif kind == PAETH:
        pred = _paeth(left, up, up_left)
    else:
        raise ValueError(kind)
    return ((raw_i - pred) % 256).astype(np.uint8)


def filtered_rows(depth: np.ndarray, filters: list[int] | np.ndarray) -> bytes:
    """The inflated IDAT stream: per row its filter type byte and its filtered big-endian samples."""
    h, w = depth.shape
    raw = depth.astype(">u2").view(np.uint8).reshape(h, 2 * w)
    prior = np.zeros(2 * w, np.uint8)
    out = bytearray()
    for y in range(h):
        out.append(int(filters[y]))
        out += filter_row(int(filters[y]), raw[y], prior).tobytes()
        prior = raw[y]
    return bytes(out)


def ihdr(w: int, h: int, bit_depth: int = 16, color_type: int = 0, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, interlace))


def png16(depth: np.ndarray, filters: list[int] | np.ndarray, level: int = 6, idat_size: int = 8192,
          extra: list[bytes] = (), stream: bytes | None = None) -> bytes:
    """A 16-bit grayscale PNG of `depth` (H x W uint16) with the given filter per row, its zlib stream
    split into IDAT chunks of idat_size bytes; `extra` chunks go before the IDATs; `stream` replaces
    the compressed rows (for broken files)."""
    h, w = depth.shape
    z = zlib.compress(filtered_rows(depth, filters), level) if stream is None else stream
    idats = [chunk(b"IDAT", z[i:i + idat_size]) for i in range(0, len(z), idat_size)] or [chunk(b"IDAT", b"")]
    return b"\x89PNG\r\n\x1a\n" + ihdr(w, h) + b"".join(extra) + b"".join(idats) + chunk(b"IEND", b"")


def random_filters(rng: np.random.Generator, h: int, allowed: tuple[int, ...] = (NONE, SUB, UP)) -> np.ndarray:
    return rng.choice(np.array(allowed), size=h)
