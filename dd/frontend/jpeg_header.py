"""Which JPEGs may cross the ring compressed and be decoded by the worker (ServerConfig.jpeg_decode).

Only those that every decoder on the worker's side reads as libjpeg-turbo (the
frontend's decoder) does: sequential Huffman-coded (SOF0, SOF1), 8 bits, three
components in YCbCr. Everything else is decoded in the frontend as before:
progressive and arithmetic-coded JPEGs (nvJPEG's batched decoder either refuses
them or decodes them on the CPU anyway), 12-bit ones, grayscale and CMYK (one or
four components), and three-component JPEGs stored as RGB rather than YCbCr (an
Adobe marker with transform 0, or components named R, G, B), whose colour
transform decoders disagree on. A JPEG the worker's GPU decoder still refuses is
decoded there on the CPU, with the frontend's decoder (dd/worker/engines/jpeg_decode.py).

The walk reads the header segments up to the frame header only (a few hundred
bytes of a camera's JPEG) and is bounded like image_cost's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from dd.frontend.image_cost import MAX_JPEG_SEGMENTS

SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # baseline, extended sequential
# Frame headers: SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC), which are tables or reserved.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
SOS, EOI = 0xDA, 0xD9


@dataclass(frozen=True)
class JpegFrame:
    """What the frame header (and the APP segments before it) say about how the JPEG decodes."""

    marker: int  # the SOF marker: 0xC0 baseline, 0xC2 progressive, 0xC9 arithmetic, ...
    precision: int  # bits per sample: 8 (or 12, 16)
    component_ids: tuple[int, ...]
    jfif: bool  # an APP0 JFIF marker: YCbCr
    adobe_transform: int | None  # the APP14 Adobe marker's transform: 0 none (RGB/CMYK), 1 YCbCr, 2 YCCK

    def worker_decodable(self) -> bool:
        """Sequential Huffman, 8 bits, YCbCr: the worker's decoders (nvJPEG, OpenCV) agree on it."""
        if self.marker not in SEQUENTIAL_HUFFMAN or self.precision != 8 or len(self.component_ids) != 3:
            return False
        if self.adobe_transform is not None and not self.jfif:
            return self.adobe_transform == 1
        # libjpeg's rule without either marker: components named R, G, B hold RGB.
        return self.jfif or self.component_ids != (0x52, 0x47, 0x42)


def header_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, offset of its FF byte, length field) of each header segment after SOI, fill bytes
    skipped, up to and including the first scan header (SOS), an end marker, or a length below 2; it
    just stops where the data is cut short or holds no marker, and after MAX_JPEG_SEGMENTS. A segment's
    body is data[offset + 4:offset + 2 + length], which may run past the data's end: callers check."""
    n = len(data)
    i = 2  # after SOI
    for _ in range(MAX_JPEG_SEGMENTS):
        while i + 1 < n and data[i] == 0xFF and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        if i + 4 > n or data[i] != 0xFF:
            return
        marker, length = data[i + 1], struct.unpack_from(">H", data, i + 2)[0]
        yield marker, i, length
        if marker in (SOS, EOI) or length < 2:
            return
        i += 2 + length


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The JPEG's frame description, or None when its header has no frame before the first scan (or is
    cut short): such data is left to the frontend's decoder to judge."""
    jfif = False
    adobe: int | None = None
    for marker, at, length in header_segments(data):
        body = data[at + 4:at + 2 + length]
        if marker in (SOS, EOI) or length < 2:
            return None
        if marker == 0xE0 and body[:5] == b"JFIF\x00":
            jfif = True
        elif marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe = body[11]
        elif marker in SOF_MARKERS:
            if len(body) < 6:
                return None
            precision, count = body[0], body[5]
            ids = tuple(body[6 + 3 * k] for k in range(count) if 6 + 3 * k < len(body))
            return JpegFrame(marker, precision, ids, jfif, adobe)
    return None


def worker_decodable(data: bytes) -> bool:
    """Whether this JPEG may go to the worker compressed (see the module's docstring)."""
    frame = jpeg_frame(data)
    return frame is not None and frame.worker_decodable()
