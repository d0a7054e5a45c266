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
a small file cannot make the frontend allocate more than its image's size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from isal import isal_zlib

from dd.png_rows import PAETH, UP, rows_nbytes

SIGNATURE = b"\x89PNG\r\n\x1a\n"
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
    return Gray16(width, height, b"".join(idat))


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
