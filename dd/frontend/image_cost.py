"""What decoding an encoded image will cost, told from its structure before any pixel is decoded.

A header's width and height bound the memory a decode takes, but not its time:
a progressive JPEG of a few hundred KB can hold thousands of scans, each of
which makes the decoder pass over the whole image again (about 0.8 ms a scan
at 3840x2160), and a small PNG can carry thousands of compressed text chunks
that libpng inflates one after the other (8 MB each). A running decode cannot
be interrupted, so such an image must be refused before it starts.

Everything here walks the container's segments (JPEG markers, PNG chunks)
without decoding anything; the walk itself is bounded (MAX_JPEG_SEGMENTS,
MAX_PNG_CHUNKS), so the check cannot become the cost it guards against.
"""

from __future__ import annotations

import re
import struct

# Header segments (tables, APPn, frame and scan headers) one JPEG may have. A camera's JPEG has
# about 10; a progressive one 20 to 40. Not configurable: far above any real file, and it bounds
# the Python loop below.
MAX_JPEG_SEGMENTS = 1024
# Chunks of one PNG. Encoders split the pixel data (IDAT) in chunks of 8 KB or more, so this
# allows 128 MB of pixel data, more than any message; it bounds the loop below.
MAX_PNG_CHUNKS = 16384
# The PNG chunks that decide the pixels; every other (ancillary) chunk is removed before decoding.
# libpng inflates compressed text and profile chunks (zTXt, iTXt, iCCP) even though nothing here
# reads them, at up to 8 MB each, and OpenCV ignores colour metadata anyway.
PNG_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})

# In entropy-coded JPEG data a 0xFF byte is followed by 0x00 (a stuffed byte) or by a restart
# marker (0xD0-0xD7); anything else ends the scan.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_SOS, _EOI = 0xDA, 0xD9


class CostError(ValueError):
    """The image would cost more to decode than allowed, or its structure is broken; says which."""


def jpeg_scans(data: bytes, max_scans: int) -> int:
    """The number of scans (SOS segments) in a JPEG; CostError past `max_scans` or MAX_JPEG_SEGMENTS.

    Stops counting as soon as a limit is passed, so a file of a million scans costs as little to
    refuse as one just over the limit.
    """
    n = len(data)
    i = 2  # after SOI
    scans = segments = 0
    while i < n:
        if data[i] != 0xFF:  # garbage between segments: the decoder skips to the next marker, as we do
            found = _SCAN_END.search(data, i)
            if found is None:
                break
            i = found.start()
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker == _EOI:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers carry no length
            continue
        if i + 2 > n:
            break
        length = struct.unpack_from(">H", data, i)[0]
        if length < 2:
            raise CostError(f"JPEG segment 0x{marker:02X} has an impossible length {length}")
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise CostError(f"JPEG has more than {MAX_JPEG_SEGMENTS} segments")
        i += length
        if marker == _SOS:
            scans += 1
            if scans > max_scans:
                raise CostError(f"JPEG has more than {max_scans} scans (max_jpeg_scans); a progressive JPEG "
                                "has about 10: re-encode it")
            found = _SCAN_END.search(data, i)  # the entropy-coded data runs to the next marker
            if found is None:
                break
            i = found.start()
    return scans


def png_pixel_chunks(data: bytes) -> bytes:
    """The PNG with only the chunks that decide its pixels (PNG_PIXEL_CHUNKS); the same bytes when it
    has no other. CostError past MAX_PNG_CHUNKS. A chunk that runs past the end is left for the
    decoder to refuse, as are bad CRCs."""
    n = len(data)
    i = 8  # after the signature
    chunks = 0
    keep: list[tuple[int, int]] = []  # (start, end) of the chunks kept
    dropped = False
    while i + 8 <= n:
        length = struct.unpack_from(">I", data, i)[0]
        kind = data[i + 4:i + 8]
        end = min(n, i + 12 + length)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise CostError(f"PNG has more than {MAX_PNG_CHUNKS} chunks")
        if kind in PNG_PIXEL_CHUNKS:
            keep.append((i, end))
        else:
            dropped = True
        i = end
        if kind == b"IEND":
            break
    if not dropped:
        return data
    return data[:8] + b"".join(data[a:b] for a, b in keep)
