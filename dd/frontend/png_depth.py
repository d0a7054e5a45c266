"""A 16-bit grayscale depth PNG read by hand as far as its filtered rows: chunks, CRCs, and ISA-L's inflate.

The standard RGB-D request carries its depth as a 16-bit PNG; OpenCV decodes one 1280x720 frame in
about 10 ms on one core, of which zlib's inflate is 5-7 ms and libpng's row filters most of the rest.
ISA-L (`isal`) inflates the same data in about 3 ms. Where every worker of the model reconstructs
rows on its GPU (Pong.gpu_png_rows), the frontend stops there: the rows go into the ring slot as
they are (dd.png_rows), provided each is filtered with None, Sub or Up; otherwise OpenCV decodes
the file as before (inflating stops at the first Average or Paeth row, so that costs little more).

Only the simple, common case is read here (`parse` answers None for anything else, which then takes
the OpenCV path unchanged): colour type 0 (grayscale), bit depth 16, no interlacing, and no chunks
but IHDR, IDAT, IEND and ancillary ones that OpenCV's path drops anyway (dd.frontend.image_cost:
a tRNS or PLTE, which can change what OpenCV returns, also goes the OpenCV way). The checks are
libpng's for what is read: every critical chunk's CRC, the zlib stream's own checksum, exactly
H x (1 + 2W) bytes inflated, and filter types 0-4. Inflating stops at that many bytes plus one, so
a small file cannot make the frontend allocate more than its image's size (inflated in N parts, N
times that at most, for the one request a frontend splits at a time).
"""

from __future__ import annotations

import struct
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from isal import isal_zlib

from dd.png_rows import PAETH, UP, rows_nbytes

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FLUSH_MARKER = b"\x00\x00\xff\xff"  # the empty stored block a sync or full flush ends with
_CRITICAL_READ = frozenset({b"IHDR", b"IDAT", b"IEND"})


class PngError(ValueError):
    """The PNG is broken (a bad CRC, truncated, data that does not inflate, the wrong amount of it);
    the message says what, for the client."""


@dataclass
class Gray16:
    """A 16-bit grayscale, non-interlaced PNG's size and its compressed rows (the IDAT data, joined)."""

    width: int
    height: int
    stream: bytes
    # Where IDAT chunks end right after a flush marker (an empty stored block, 00 00 FF FF): offsets
    # in `stream` where the deflate data may start anew (see inflate_parts_into).
    flush_points: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes of its inflated rows."""
        return rows_nbytes(self.height, self.width)


def parse(data: bytes) -> Gray16 | None:
    """The image's rows, still compressed, if it is a PNG read here (the module's docstring); None for any
    other PNG. PngError for a broken one: a chunk cut short, a bad CRC in a critical chunk, no IDAT."""
    if data[:8] != SIGNATURE:
        return None
    n = len(data)
    pos = 8
    header: tuple[int, ...] | None = None
    idat: list[memoryview] = []
    view = memoryview(data)
    ended = False
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body_end = pos + 8 + length
        if body_end + 4 > n:
            raise PngError(f"PNG chunk {kind!r} at byte {pos} runs past the end of the data; the file is truncated")
        critical = not kind[0] & 0x20  # an uppercase first letter
        if critical:
            if kind not in _CRITICAL_READ:
                return None  # PLTE or a chunk libpng may refuse: OpenCV's path answers for it
            stored = struct.unpack_from(">I", data, body_end)[0]
            if isal_zlib.crc32(view[pos + 4:body_end]) != stored:
                raise PngError(f"PNG chunk {kind.decode('latin-1')} at byte {pos} has a bad CRC; the file is corrupt")
        elif kind == b"tRNS":
            return None
        if kind == b"IHDR":
            if length != 13 or header is not None or pos != 8:
                raise PngError("PNG IHDR chunk is not the first chunk or not 13 bytes long")
            header = struct.unpack_from(">IIBBBBB", data, pos + 8)
        elif kind == b"IDAT":
            idat.append(view[pos + 8:body_end])
        pos = body_end + 4
        if kind == b"IEND":
            ended = True
            break
    if header is None:
        raise PngError("PNG has no IHDR chunk first")
    width, height, bit_depth, color_type, compression, filter_method, interlace = header
    if (bit_depth, color_type, compression, filter_method, interlace) != (16, 0, 0, 0, 0):
        return None
    if not ended:
        raise PngError("PNG has no IEND chunk; the file is truncated")
    if not idat:
        raise PngError("PNG has no IDAT chunk: it holds no pixels")
    ends, at = [], 0
    for chunk in idat[:-1]:
        at += len(chunk)
        if at >= 6 and bytes(chunk[-4:]) == _FLUSH_MARKER:
            ends.append(at)
    return Gray16(width, height, b"".join(idat), tuple(ends))


def inflate_into(image: Gray16, out: np.ndarray) -> np.ndarray | None:
    """Inflates the rows into `out` (at least image.nbytes uint8, e.g. a view of the ring slot) and returns
    them, height x (1 + 2 x width), if every row is filtered with None, Sub or Up (dd.png_rows.SENT_FILTERS).
    Returns None as soon as a row filtered with Average or Paeth appears: the image then goes as pixels,
    and the rest is not inflated (libpng's adaptive filtering, what any explicit compression level in
    OpenCV asks for, mixes in Average rows from the second row on, so such images cost little here).
    PngError if the stream is not zlib data, holds another amount, or a row has a filter type PNG does
    not define."""
    expected = image.nbytes
    row = 1 + 2 * image.width
    dst = out[:expected]
    inflater = isal_zlib.decompressobj()
    stream = image.stream
    done = 0
    try:
        for target in _pieces(image.height, row):
            piece = inflater.decompress(stream, target - done)
            stream = inflater.unconsumed_tail
            end = done + len(piece)
            dst[done:end] = np.frombuffer(piece, np.uint8)
            filters = dst[done:end - (end - done) % row:row]  # the first byte of each whole row
            if filters.size and int(filters.max()) > UP:
                bad = int(np.argmax(filters > UP))
                if filters[bad] > PAETH:
                    raise PngError(f"PNG row {done // row + bad} has filter type {int(filters[bad])}; PNG defines "
                                   "0 to 4: the file is corrupt")
                return None
            done = end
            if end < target:
                break
        extra = inflater.decompress(stream, 1) if done == expected else b""
    except isal_zlib.error as exc:
        raise PngError(f"PNG pixel data (IDAT) is not valid zlib data ({exc}); the file is corrupt") from None
    if extra:
        raise PngError(f"PNG pixel data inflates to more than the {expected} bytes a {image.width}x{image.height} "
                       "16-bit grayscale image holds; the file is corrupt")
    if not inflater.eof:
        raise PngError(f"PNG pixel data ends after {done} of {expected} bytes (its zlib stream is cut "
                       "short); the file is truncated")
    if done < expected:
        raise PngError(f"PNG pixel data holds {done} bytes but a {image.width}x{image.height} 16-bit "
                       f"grayscale image needs {expected}; the file is corrupt")
    return dst.reshape(image.height, row)


def _pieces(height: int, row: int) -> list[int]:
    """Where inflating pauses to look at the filter types so far (bytes, whole rows): after 4 rows, then
    every eighth of the image, so that an image with an Average or Paeth row stops early."""
    marks = {min(height, 4)} | {min(height, -(-height * k // 8)) for k in range(1, 9)}
    return [m * row for m in sorted(marks)]


def inflate_parts_into(image: Gray16, out: np.ndarray, parts: int, pool: Executor) -> np.ndarray | None:
    """inflate_into's answer, with the zlib stream inflated in up to `parts` parts at once (the first in
    this thread, the others on `pool`) where its writer made that possible.

    A writer that ends an IDAT chunk with a full flush (dd.client.encoding.encode_png16 does, every
    eighth of the rows) starts the next one with a fresh deflate state: the data from there inflates
    on its own. Nothing here trusts that: each part is inflated with an empty window, so a reference
    back into an earlier part is an error rather than a wrong byte; every part but the last must end
    without a final block and the last with one, followed by exactly the 4-byte checksum; the parts
    together must hold exactly the image's bytes, whose Adler-32 must be that checksum. Anything else
    (and a stream without flush points) is inflated in one piece by inflate_into, which says what is
    wrong, if anything. Each part is inflated into memory of its own, at most the image's size (the
    decoder says where a part ends only once it is inflated), then copied into place."""
    starts = _part_starts(image, parts)
    if len(starts) < 2 or not _plain_zlib_header(image.stream):
        return inflate_into(image, out)
    ends = starts[1:] + [len(image.stream)]
    jobs = [pool.submit(_inflate_part, image.stream, a, b, image.nbytes) for a, b in zip(starts[1:], ends[1:])]
    results = [_inflate_part(image.stream, starts[0] + 2, ends[0], image.nbytes)] + [j.result() for j in jobs]
    expected, row = image.nbytes, 1 + 2 * image.width
    pieces = [r[0] for r in results if r is not None]
    finals = [r[1] for r in results if r is not None]
    tail = results[-1][2] if results[-1] is not None else b""
    if (len(pieces) != len(results) or any(finals[:-1]) or not finals[-1] or len(tail) != 4
            or sum(len(p) for p in pieces) != expected):
        return inflate_into(image, out)
    dst = out[:expected]
    at = 0
    for piece in pieces:
        dst[at:at + len(piece)] = np.frombuffer(piece, np.uint8)
        at += len(piece)
    if isal_zlib.adler32(dst) != struct.unpack(">I", tail)[0]:
        return inflate_into(image, out)
    filters = dst[::row]
    if int(filters.max()) > UP:  # as inflate_into judges: by the first row that is not None, Sub or Up
        bad = int(np.argmax(filters > UP))
        if filters[bad] > PAETH:
            raise PngError(f"PNG row {bad} has filter type {int(filters[bad])}; PNG defines 0 to 4: the file is "
                           "corrupt")
        return None
    return dst.reshape(image.height, row)


def _part_starts(image: Gray16, parts: int) -> list[int]:
    """Offsets in the stream where parts begin (0 first): flush points nearest to equal shares."""
    points = image.flush_points
    if parts < 2 or not points:
        return [0]
    starts = [0]
    for k in range(1, parts):
        want = len(image.stream) * k / parts
        best = min(points, key=lambda p: abs(p - want))
        if best > starts[-1]:
            starts.append(best)
    return starts


def _plain_zlib_header(stream: bytes) -> bool:
    """Deflate with a window PNG allows and no preset dictionary (which a part could not see)."""
    return (len(stream) >= 2 and stream[0] & 0x0F == 8 and stream[0] >> 4 <= 7 and not stream[1] & 0x20
            and (stream[0] << 8 | stream[1]) % 31 == 0)


def _inflate_part(stream: bytes, start: int, end: int, limit: int) -> tuple[bytes, bool, bytes] | None:
    """One part as raw deflate with an empty window: (its bytes, whether it ended with a final block,
    what follows that block); None if it is not valid on its own or inflates past `limit` bytes."""
    inflater = isal_zlib.decompressobj(-15)
    try:
        piece = inflater.decompress(memoryview(stream)[start:end], limit + 1)
    except isal_zlib.error:
        return None
    if len(piece) > limit or (inflater.unconsumed_tail and not inflater.eof):
        return None
    after = bytes(inflater.unused_data)
    if inflater.eof and not after:
        # isal before 1.9 reports nothing after a raw stream's final block (unused_data stays empty): what
        # follows is taken to be the part's last 4 bytes, and a wrong checksum is refused as any is.
        after = bytes(stream[max(start, end - 4):end])
    return piece, inflater.eof, after
